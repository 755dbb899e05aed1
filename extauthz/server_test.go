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
)

// startGRPC serves srv on 127.0.0.1:0 and returns a client connected to it.
func startGRPC(tb testing.TB, srv authv3.AuthorizationServer) authv3.AuthorizationClient {
	tb.Helper()
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		tb.Fatal(err)
	}
	gs := grpc.NewServer()
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

// benchResults carries the p50 of each latency run to the ratio report.
var benchResults = map[string]time.Duration{}

// BenchmarkCheckLoopback measures Check over loopback gRPC for mcpgate (a cached RS256
// token, decision logging and metrics on) beside a no-op server in the same run.
// latency/* are sequential calls (p50, p99); throughput/* are many concurrent callers.
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
	servers := []struct {
		name   string
		client authv3.AuthorizationClient
	}{
		{"noop", startGRPC(b, noopServer{})},
		{"mcpgate", startGRPC(b, srv)},
	}
	check := req{target: "inventory", principal: agentID, headers: bearerHeader(f.token(b, nil))}.build()
	ctx := context.Background()
	for _, s := range servers {
		resp, err := s.client.Check(ctx, check) // warm the connection and the token cache
		if err != nil || resp.GetStatus().GetCode() != int32(codes.OK) {
			b.Fatalf("%s warm-up: %v %v", s.name, resp, err)
		}
	}
	for _, s := range servers {
		b.Run("latency/"+s.name, func(b *testing.B) {
			lat := make([]time.Duration, 0, 1<<16)
			for b.Loop() {
				t0 := time.Now()
				if _, err := s.client.Check(ctx, check); err != nil {
					b.Fatal(err)
				}
				lat = append(lat, time.Since(t0))
			}
			sort.Slice(lat, func(i, j int) bool { return lat[i] < lat[j] })
			p50, p99 := lat[len(lat)/2], lat[len(lat)*99/100]
			benchResults[s.name] = p50
			b.ReportMetric(float64(p50.Nanoseconds())/1e3, "p50-µs")
			b.ReportMetric(float64(p99.Nanoseconds())/1e3, "p99-µs")
		})
	}
	for _, s := range servers {
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
	b.Run("p50-ratio", func(b *testing.B) {
		for b.Loop() {
		}
		if benchResults["noop"] > 0 {
			b.ReportMetric(float64(benchResults["mcpgate"])/float64(benchResults["noop"]), "mcpgate/noop")
		}
	})
}
