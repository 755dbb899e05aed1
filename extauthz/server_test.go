package extauthz

import (
	"context"
	"io"
	"net"
	"sort"
	"strings"
	"sync"
	"testing"
	"time"

	authv3 "github.com/envoyproxy/go-control-plane/envoy/service/auth/v3"
	sdkmetric "go.opentelemetry.io/otel/sdk/metric"
	"go.opentelemetry.io/otel/sdk/metric/metricdata"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"google.golang.org/genproto/googleapis/rpc/status"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/protobuf/proto"
)

// startGRPC serves srv on 127.0.0.1:0 and returns a client connected to it.
func startGRPC(tb testing.TB, srv authv3.AuthorizationServer) authv3.AuthorizationClient {
	tb.Helper()
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		tb.Fatal(err)
	}
	gs := grpc.NewServer(ServerOptions()...)
	authv3.RegisterAuthorizationServer(gs, srv)
	go func() { _ = gs.Serve(lis) }()
	tb.Cleanup(gs.Stop)
	conn, err := grpc.NewClient("passthrough:///"+lis.Addr().String(), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { conn.Close() })
	return authv3.NewAuthorizationClient(conn)
}

// productionLogger encodes decision lines exactly as `mcpgate serve` does, into io.Discard,
// so that tests and benchmarks pay the real logging cost.
func productionLogger(w io.Writer) *zap.Logger {
	enc := zapcore.NewJSONEncoder(zap.NewProductionEncoderConfig())
	return zap.New(zapcore.NewCore(enc, zapcore.AddSync(w), zap.InfoLevel))
}

type lockedBuffer struct {
	mu  sync.Mutex
	buf []byte
}

func (l *lockedBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.buf = append(l.buf, p...)
	return len(p), nil
}

func (l *lockedBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return string(l.buf)
}

func TestCheckLoopback(t *testing.T) {
	f := newFixture(t)
	logs := &lockedBuffer{}
	reader := sdkmetric.NewManualReader()
	meter := sdkmetric.NewMeterProvider(sdkmetric.WithReader(reader)).Meter("test")
	srv, err := NewServer(Options{Store: f.server.store, Verifier: f.server.verifier, DecisionLog: productionLogger(logs), Meter: meter})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(srv.Close)
	client := startGRPC(t, srv)
	tok := f.token(t, nil)

	// Concurrent Checks over one connection, mixing allowed and denied requests.
	var wg sync.WaitGroup
	errs := make(chan error, 64)
	for i := range 64 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			r := req{target: "inventory", principal: agentID, headers: bearerHeader(tok)}
			want := codes.OK
			if i%2 == 1 {
				r.headers = nil
				want = codes.Unauthenticated
			}
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			resp, err := client.Check(ctx, r.build())
			if err != nil {
				errs <- err
				return
			}
			if got := codes.Code(resp.GetStatus().GetCode()); got != want {
				errs <- &statusErr{got, want}
			}
		}()
	}
	wg.Wait()
	close(errs)
	srv.Flush()
	for err := range errs {
		t.Error(err)
	}

	// One decision-log line per Check, without the token.
	out := logs.String()
	if n := strings.Count(out, "\n"); n != 64 {
		t.Errorf("decision log has %d lines, want 64", n)
	}
	for _, part := range []string{tok[:20], tok[len(tok)-20:]} {
		if strings.Contains(out, part) {
			t.Fatal("decision log contains the token")
		}
	}

	// Counters by decision and reason.
	var rm metricdata.ResourceMetrics
	if err := reader.Collect(context.Background(), &rm); err != nil {
		t.Fatal(err)
	}
	got := map[string]int64{}
	for _, sm := range rm.ScopeMetrics {
		for _, m := range sm.Metrics {
			if sum, ok := m.Data.(metricdata.Sum[int64]); ok && m.Name == "mcpgate.authz.decisions" {
				for _, dp := range sum.DataPoints {
					reason, _ := dp.Attributes.Value("reason")
					got[reason.AsString()] += dp.Value
				}
			}
		}
	}
	if got[ReasonAllowed] != 32 || got[ReasonTokenMissing] != 32 {
		t.Errorf("decision counters = %v, want 32 allowed and 32 token_missing", got)
	}
}

type statusErr struct{ got, want codes.Code }

func (e *statusErr) Error() string { return "status " + e.got.String() + ", want " + e.want.String() }

// noopServer answers every Check with OK at once: the floor that gRPC and loopback cost.
type noopServer struct {
	authv3.UnimplementedAuthorizationServer
}

func (noopServer) Check(context.Context, *authv3.CheckRequest) (*authv3.CheckResponse, error) {
	return &authv3.CheckResponse{Status: &status.Status{Code: int32(codes.OK)}}, nil
}

// BenchmarkCheckLoopback measures Check over loopback gRPC for mcpgate (a cached RS256
// token, decision logging and metrics on, as `mcpgate serve` runs) beside a no-op server
// in the same run.
//
// latency alternates one no-op and one mcpgate call per iteration, so both see the same
// machine noise (on a shared 2-core machine, runs minutes apart differ by 50%), and
// reports p50/p99 of each and the p50 ratio. throughput/* saturate each server with
// concurrent callers on one connection.
func BenchmarkCheckLoopback(b *testing.B) {
	f := newFixture(b)
	reader := sdkmetric.NewManualReader()
	srv, err := NewServer(Options{
		Store: f.server.store, Verifier: f.server.verifier, DecisionLog: productionLogger(io.Discard),
		Meter: sdkmetric.NewMeterProvider(sdkmetric.WithReader(reader)).Meter("bench"),
	})
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(srv.Close)
	noop, gate := startGRPC(b, noopServer{}), startGRPC(b, srv)
	check := req{target: "inventory", principal: agentID, headers: bearerHeader(f.token(b, nil))}.build()
	ctx := context.Background()
	for _, c := range []authv3.AuthorizationClient{noop, gate} {
		resp, err := c.Check(ctx, check) // warm the connection and the token cache
		if err != nil || resp.GetStatus().GetCode() != int32(codes.OK) {
			b.Fatalf("warm-up: %v %v", resp, err)
		}
	}
	timed := func(c authv3.AuthorizationClient) time.Duration {
		t0 := time.Now()
		if _, err := c.Check(ctx, check); err != nil {
			b.Fatal(err)
		}
		return time.Since(t0)
	}
	b.Run("latency", func(b *testing.B) {
		var ln, lg []time.Duration
		i := 0
		for b.Loop() {
			if i%2 == 0 {
				ln, lg = append(ln, timed(noop)), append(lg, timed(gate))
			} else {
				lg, ln = append(lg, timed(gate)), append(ln, timed(noop))
			}
			i++
		}
		pn50, pn99 := percentiles(ln)
		pg50, pg99 := percentiles(lg)
		b.ReportMetric(us(pn50), "noop-p50-µs")
		b.ReportMetric(us(pn99), "noop-p99-µs")
		b.ReportMetric(us(pg50), "mcpgate-p50-µs")
		b.ReportMetric(us(pg99), "mcpgate-p99-µs")
		b.ReportMetric(float64(pg50)/float64(pn50), "p50-ratio")
	})
	for _, s := range []struct {
		name   string
		client authv3.AuthorizationClient
	}{{"noop", noop}, {"mcpgate", gate}} {
		b.Run("throughput/"+s.name, func(b *testing.B) {
			b.SetParallelism(16) // many concurrent Envoy workers on one connection
			b.RunParallel(func(pb *testing.PB) {
				for pb.Next() {
					if _, err := s.client.Check(ctx, check); err != nil {
						b.Error(err)
						return
					}
				}
			})
			b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "checks/s")
		})
	}
}

func percentiles(d []time.Duration) (p50, p99 time.Duration) {
	sort.Slice(d, func(i, j int) bool { return d[i] < d[j] })
	return d[len(d)/2], d[len(d)*99/100]
}

func us(d time.Duration) float64 { return float64(d.Nanoseconds()) / 1e3 }

// BenchmarkDecide is the decision and response building alone, without gRPC: what
// mcpgate adds on the request path beyond transport.
func BenchmarkDecide(b *testing.B) {
	f := newFixture(b)
	check := req{target: "inventory", principal: agentID, headers: bearerHeader(f.token(b, nil))}.build()
	snap := f.server.store.Current()
	ctx := context.Background()
	b.ReportAllocs()
	var size int
	for b.Loop() {
		d := f.server.decide(ctx, snap, check)
		resp := d.Response()
		if !d.Allowed {
			b.Fatal(d.Detail)
		}
		size = proto.Size(resp)
	}
	b.ReportMetric(float64(size), "response-bytes")
	b.ReportMetric(float64(proto.Size(check)), "request-bytes")
}
