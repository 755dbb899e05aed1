package extauthz

import (
	"runtime"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/keepalive"
)

// ServerOptions are the gRPC server options `mcpgate serve` uses. They live here so that
// benchmarks and loopback tests measure the server that ships.
//
//   - Stream workers: a fixed pool of goroutines handles RPCs instead of one new goroutine
//     per RPC, whose stack then grows on every Check (visible in profiles as copystack).
//   - Keepalive enforcement allows the pings Envoy sends on long-lived ext_proc and xDS
//     streams (a stricter policy makes grpc-go close the connection with GOAWAY).
func ServerOptions() []grpc.ServerOption {
	return []grpc.ServerOption{
		grpc.NumStreamWorkers(uint32(runtime.GOMAXPROCS(0))),
		grpc.KeepaliveEnforcementPolicy(keepalive.EnforcementPolicy{MinTime: 10 * time.Second, PermitWithoutStream: true}),
		grpc.KeepaliveParams(keepalive.ServerParameters{Time: 30 * time.Second, Timeout: 10 * time.Second}),
	}
}
