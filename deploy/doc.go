// Package deploy holds no code: its tests keep docker-compose.yaml, the Dockerfile, the
// Envoy bootstraps in envoy/bootstrap/ and the Kubernetes manifests in deploy/kubernetes/
// consistent with the demo policy (testdata/demo), since neither Docker nor Kubernetes
// can run where this project is developed, and hold them to SPIFFE mTLS between the
// Envoys and mcpgate (serve_tls_test.go).
//
//	go test ./deploy/...            check
//	go test ./deploy -update        rewrite deploy/compose/policy and the ConfigMaps copied
//	                                from testdata/demo and envoy/bootstrap (make bootstraps
//	                                does it, with the bootstraps in between)
package deploy
