package policy

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"go.uber.org/zap/zaptest/observer"
)

// The watch tests use a tiny policy of their own: the Mesh of testdata/demo/mesh.yaml and
// one App with an mcp block whose single rule names one tool, so an edit is a new tool name.

const watchMeshYAML = `apiVersion: mcpgate.dev/v1alpha1
kind: Mesh
metadata:
  name: default
spec:
  trustDomain: example.org
  mtls: strict
  authz:
    address: mcpgate:9001
  sds:
    spireAgentSocket: /run/spire/agent.sock
  issuers:
    - name: corp
      issuer: https://login.example.com/
      jwksUri: https://login.example.com/keys
      audiences: [api://mcp-server, https://inventory.example.com/mcp]
`

// watchAppYAML is an App whose one rule allows tool; extra is appended to the tools block
// (e.g. a rego line).
func watchAppYAML(tool, extra string) string {
	return `apiVersion: mcpgate.dev/v1alpha1
kind: App
metadata:
  name: inventory
spec:
  address: inventory:8000
  sidecar: {address: inventory-envoy, inboundPort: 15006, outboundPort: 3500}
  mcp:
    resource: https://inventory.example.com/mcp
    authentication:
      issuers: [corp]
    tools:
      rules:
        - name: readers
          tools: [` + tool + `]
          action: allow
` + extra
}

func watchRego(reason string) string {
	return `package mcpgate

default decision := {"allow": false, "reason": "` + reason + `"}

decision := {"allow": true} if input.mcp.tool == "get_inventory"
`
}

// watchPolicyDir writes the mesh and an app allowing get_inventory into a new directory.
func watchPolicyDir(t *testing.T) string {
	t.Helper()
	dir := t.TempDir()
	watchWrite(t, filepath.Join(dir, "mesh.yaml"), watchMeshYAML)
	watchWrite(t, filepath.Join(dir, "app.yaml"), watchAppYAML("get_inventory", ""))
	return dir
}

func watchWrite(t *testing.T, path, content string) {
	t.Helper()
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(path, []byte(content), 0o644); err != nil {
		t.Fatal(err)
	}
}

// requireEventually polls cond until it holds, failing the test after within.
func requireEventually(t *testing.T, within time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(within)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("not within %v: %s", within, what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// requireDirVersion loads dir directly and returns its version.
func requireDirVersion(t *testing.T, dir string) string {
	t.Helper()
	snap, err := LoadDir(context.Background(), dir)
	if err != nil {
		t.Fatalf("load %s: %v", dir, err)
	}
	return snap.Version
}

// reloadResult is one OnReload call.
type reloadResult struct {
	result string
	snap   *Snapshot
	err    error
}

// watchHarness runs Watch in the background and records its loads and reload results.
type watchHarness struct {
	store *Store
	loads atomic.Int64

	mu      sync.Mutex
	results []reloadResult

	done    chan struct{}
	watchEr error // what Watch returned; read after done is closed
	cancel  context.CancelFunc
}

// startWatch starts Watch on dir and returns once its watch is set up, which it knows from
// the first reload (Watch loads once as soon as its watch is in place). store defaults to
// one holding the current contents of dir, as `mcpgate serve` does.
func startWatch(t *testing.T, dir string, store *Store, opts WatchOptions) *watchHarness {
	t.Helper()
	if store == nil {
		snap, err := LoadDir(context.Background(), dir)
		if err != nil {
			t.Fatalf("initial load: %v", err)
		}
		store = NewStore(snap)
	}
	h := &watchHarness{store: store, done: make(chan struct{})}
	opts.Dir = dir
	load := opts.Load
	if load == nil {
		load = LoadDir
	}
	opts.Load = func(ctx context.Context, dir string) (*Snapshot, error) {
		h.loads.Add(1)
		return load(ctx, dir)
	}
	opts.OnReload = func(result string, snap *Snapshot, err error) {
		h.mu.Lock()
		h.results = append(h.results, reloadResult{result, snap, err})
		h.mu.Unlock()
	}
	ctx, cancel := context.WithCancel(context.Background())
	h.cancel = cancel
	go func() {
		defer close(h.done)
		h.watchEr = Watch(ctx, store, opts)
	}()
	t.Cleanup(func() { h.stop(t) })
	requireEventually(t, 5*time.Second, "Watch set up and loaded once", func() bool {
		select {
		case <-h.done:
			t.Fatalf("Watch returned early: %v", h.watchEr)
		default:
		}
		return h.mark() > 0
	})
	return h
}

// stop cancels Watch and requires it to return within a second, without error.
func (h *watchHarness) stop(t *testing.T) {
	t.Helper()
	h.cancel()
	select {
	case <-h.done:
		if h.watchEr != nil {
			t.Errorf("Watch returned %v after cancel, want nil", h.watchEr)
		}
	case <-time.After(time.Second):
		t.Errorf("Watch did not return within 1s of cancel")
	}
}

// mark returns how many reloads have been reported so far.
func (h *watchHarness) mark() int {
	h.mu.Lock()
	defer h.mu.Unlock()
	return len(h.results)
}

// requireResult waits for a reload reported after mark with the wanted result.
func (h *watchHarness) requireResult(t *testing.T, mark int, within time.Duration, want string) reloadResult {
	t.Helper()
	var got reloadResult
	requireEventually(t, within, "a reload with result "+want, func() bool {
		h.mu.Lock()
		defer h.mu.Unlock()
		for _, r := range h.results[mark:] {
			if r.result == want {
				got = r
				return true
			}
		}
		return false
	})
	return got
}

func (h *watchHarness) requireVersion(t *testing.T, within time.Duration, want string) {
	t.Helper()
	requireEventually(t, within, "store at version "+want, func() bool {
		return h.store.Current() != nil && h.store.Current().Version == want
	})
}

func TestWatchAppliesGoodEdit(t *testing.T) {
	dir := watchPolicyDir(t)
	h := startWatch(t, dir, nil, WatchOptions{})
	before := h.store.Current().Version

	mark := h.mark()
	watchWrite(t, filepath.Join(dir, "app.yaml"), watchAppYAML("list_items", ""))
	r := h.requireResult(t, mark, time.Second, ReloadApplied)

	cur := h.store.Current()
	if cur.Version == before {
		t.Fatalf("version unchanged after an edit: %s", cur.Version)
	}
	if r.snap != cur || r.err != nil {
		t.Errorf("OnReload(applied) got snap %p err %v, want the published snapshot %p and no error", r.snap, r.err, cur)
	}
	if want := requireDirVersion(t, dir); cur.Version != want {
		t.Errorf("version %s, want %s (the files on disk)", cur.Version, want)
	}
	if g := cur.App("inventory").MCP.Tools.Rules[0].Tools[0]; !g.Match("list_items") {
		t.Errorf("rule names %s, want list_items", g)
	}
}

func TestWatchKeepsLastGoodOnBadEdit(t *testing.T) {
	core, logs := observer.New(zapcore.DebugLevel)
	dir := watchPolicyDir(t)
	h := startWatch(t, dir, nil, WatchOptions{Logger: zap.New(core)})
	good := h.store.Current()
	app := filepath.Join(dir, "app.yaml")
	original := watchAppYAML("get_inventory", "")

	// An unknown field under spec, placed on a known line. Its value stands for anything
	// private in a policy file: it must not reach the log.
	bad := strings.Replace(original, "  address: inventory:8000\n", "  address: inventory:8000\n  bogus: canary-6f1d\n", 1)
	badLine := 1 + strings.Count(bad[:strings.Index(bad, "bogus:")], "\n")
	wantLoc := fmt.Sprintf("%s:%d:", app, badLine)

	mark := h.mark()
	watchWrite(t, app, bad)
	r := h.requireResult(t, mark, 5*time.Second, ReloadRejected)
	if !errors.Is(r.err, ErrInvalid) {
		t.Errorf("OnReload(rejected) err = %v, want an ErrInvalid load error", r.err)
	}
	if r.snap != good {
		t.Errorf("OnReload(rejected) snap = %p, want the snapshot in force %p", r.snap, good)
	}
	if h.store.Current() != good {
		t.Fatalf("a bad edit replaced the snapshot in force")
	}
	if st := h.store.Status(); !strings.Contains(st.LastError, wantLoc) || st.Version != good.Version {
		t.Fatalf("status = %+v, want version %s and an error at %s", st, good.Version, wantLoc)
	}

	// Logged at error level with every problem as an element of an array field, and no
	// file contents anywhere.
	var logged bool
	for _, e := range logs.All() {
		for k, v := range e.ContextMap() {
			if strings.Contains(fmt.Sprint(v), "canary-6f1d") {
				t.Errorf("log %q field %s carries file contents: %v", e.Message, k, v)
			}
		}
		if e.Level != zapcore.ErrorLevel {
			continue
		}
		probs, _ := e.ContextMap()["problems"].([]any)
		for _, p := range probs {
			if s, _ := p.(string); strings.HasPrefix(s, wantLoc) {
				logged = true
			}
		}
	}
	if !logged {
		t.Errorf("no error log with a problems entry at %s; logs: %v", wantLoc, logs.All())
	}

	// Undoing the bad edit gives the files of the snapshot in force: nothing to publish,
	// but the refusal is over.
	mark = h.mark()
	watchWrite(t, app, original)
	h.requireResult(t, mark, 5*time.Second, ReloadUnchanged)
	if h.store.Current() != good {
		t.Errorf("undoing a bad edit published a new snapshot")
	}
	if st := h.store.Status(); st.LastError != "" {
		t.Errorf("LastError = %q after the files were good again, want none", st.LastError)
	}

	// Broken again, then fixed with a real change: applied, error cleared.
	mark = h.mark()
	watchWrite(t, app, bad)
	h.requireResult(t, mark, 5*time.Second, ReloadRejected)
	mark = h.mark()
	watchWrite(t, app, watchAppYAML("list_items", ""))
	h.requireResult(t, mark, 5*time.Second, ReloadApplied)
	if st := h.store.Status(); st.LastError != "" || st.Version == good.Version {
		t.Errorf("status after the fix = %+v, want a new version and no error", st)
	}
}

func TestWatchReplaceByRename(t *testing.T) {
	dir := watchPolicyDir(t)
	h := startWatch(t, dir, nil, WatchOptions{})

	// What editors and atomic writers do: write a temporary file, rename it over the original.
	tmp := filepath.Join(dir, ".app.yaml.tmp")
	watchWrite(t, tmp, watchAppYAML("list_items", ""))
	mark := h.mark()
	if err := os.Rename(tmp, filepath.Join(dir, "app.yaml")); err != nil {
		t.Fatal(err)
	}
	h.requireResult(t, mark, 5*time.Second, ReloadApplied)
	h.requireVersion(t, 5*time.Second, requireDirVersion(t, dir))
}

func TestWatchConfigMapSymlinkSwap(t *testing.T) {
	// The layout of a Kubernetes ConfigMap volume: the real files in a timestamped
	// directory, "..data" a symlink to it, each key a symlink through "..data".
	dir := t.TempDir()
	policy := func(tool string) string { return watchMeshYAML + "---\n" + watchAppYAML(tool, "") }
	watchWrite(t, filepath.Join(dir, "..2026_11_23_x", "policy.yaml"), policy("get_inventory"))
	for _, l := range [][2]string{{"..2026_11_23_x", "..data"}, {"..data/policy.yaml", "policy.yaml"}} {
		if err := os.Symlink(l[0], filepath.Join(dir, l[1])); err != nil {
			t.Fatal(err)
		}
	}
	h := startWatch(t, dir, nil, WatchOptions{})
	before := h.store.Current().Version

	// The kubelet's update: a new timestamped directory, a new symlink, renamed over
	// "..data" (atomic), then the old directory removed. policy.yaml itself never changes.
	watchWrite(t, filepath.Join(dir, "..2026_11_23_y", "policy.yaml"), policy("list_items"))
	mark := h.mark()
	if err := os.Symlink("..2026_11_23_y", filepath.Join(dir, "..data_tmp")); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(filepath.Join(dir, "..data_tmp"), filepath.Join(dir, "..data")); err != nil {
		t.Fatal(err)
	}
	if err := os.RemoveAll(filepath.Join(dir, "..2026_11_23_x")); err != nil {
		t.Fatal(err)
	}
	h.requireResult(t, mark, 5*time.Second, ReloadApplied)
	want := requireDirVersion(t, dir)
	h.requireVersion(t, 5*time.Second, want)
	if want == before {
		t.Fatalf("the swap did not change the version")
	}
}

func TestWatchRegoSubdirectory(t *testing.T) {
	dir := watchPolicyDir(t)
	h := startWatch(t, dir, nil, WatchOptions{})
	app := filepath.Join(dir, "app.yaml")
	rego := filepath.Join(dir, "rego", "app.rego")

	// rego/ does not exist when the watch starts: it must be watched once it appears.
	mark := h.mark()
	watchWrite(t, rego, watchRego("first"))
	watchWrite(t, app, watchAppYAML("get_inventory", "      rego: rego/app.rego\n"))
	h.requireResult(t, mark, 5*time.Second, ReloadApplied)
	h.requireVersion(t, 5*time.Second, requireDirVersion(t, dir))
	before := h.store.Current().Version

	// An edit of the Rego module alone, inside rego/: nothing changes in dir itself.
	mark = h.mark()
	watchWrite(t, rego, watchRego("second"))
	h.requireResult(t, mark, 5*time.Second, ReloadApplied)
	if v := h.store.Current().Version; v == before || v != requireDirVersion(t, dir) {
		t.Errorf("version %s after a Rego edit, want the new files' version (was %s)", v, before)
	}

	// A broken module is refused with its own file:line.
	mark = h.mark()
	watchWrite(t, rego, "package mcpgate\n\ndecision := {\n")
	h.requireResult(t, mark, 5*time.Second, ReloadRejected)
	if st := h.store.Status(); !strings.Contains(st.LastError, rego+":") {
		t.Errorf("LastError = %q, want a problem in %s", st.LastError, rego)
	}
}

func TestWatchSymlinkedSubdirectory(t *testing.T) {
	// rego/ is a symlink to a directory elsewhere: edits there must be seen too.
	dir := watchPolicyDir(t)
	rego := filepath.Join(t.TempDir(), "app.rego")
	watchWrite(t, rego, watchRego("first"))
	if err := os.Symlink(filepath.Dir(rego), filepath.Join(dir, "rego")); err != nil {
		t.Fatal(err)
	}
	watchWrite(t, filepath.Join(dir, "app.yaml"), watchAppYAML("get_inventory", "      rego: rego/app.rego\n"))
	h := startWatch(t, dir, nil, WatchOptions{})
	before := h.store.Current().Version

	mark := h.mark()
	watchWrite(t, rego, watchRego("second"))
	h.requireResult(t, mark, 5*time.Second, ReloadApplied)
	if v := h.store.Current().Version; v == before {
		t.Errorf("version unchanged after an edit through the symlink")
	}
}

func TestWatchDebouncesBurst(t *testing.T) {
	dir := watchPolicyDir(t)
	h := startWatch(t, dir, nil, WatchOptions{})
	app := filepath.Join(dir, "app.yaml")

	base := h.loads.Load()
	for i := range 20 {
		watchWrite(t, app, watchAppYAML(fmt.Sprintf("tool_%d", i), ""))
	}
	h.requireVersion(t, 5*time.Second, requireDirVersion(t, dir))
	if n := h.loads.Load() - base; n > 3 {
		t.Errorf("a burst of 20 writes caused %d loads, want at most 3", n)
	}

	// A load still pending from the burst would come before the next edit is applied.
	burst := h.loads.Load() - base
	watchWrite(t, app, watchAppYAML("sentinel", ""))
	h.requireVersion(t, 5*time.Second, requireDirVersion(t, dir))
	if n := h.loads.Load() - base - burst; n != 1 {
		t.Errorf("one write after the burst caused %d loads, want 1", n)
	}
}

func TestWatchTouchIsUnchanged(t *testing.T) {
	dir := watchPolicyDir(t)
	h := startWatch(t, dir, nil, WatchOptions{})
	before := h.store.Current()
	published, unsubscribe := h.store.Subscribe()
	defer unsubscribe()

	mark := h.mark()
	app := filepath.Join(dir, "app.yaml")
	watchWrite(t, app, watchAppYAML("get_inventory", "")) // the same bytes
	now := time.Now()
	if err := os.Chtimes(app, now, now); err != nil {
		t.Fatal(err)
	}
	r := h.requireResult(t, mark, 5*time.Second, ReloadUnchanged)
	if r.snap != before {
		t.Errorf("OnReload(unchanged) snap = %p, want the snapshot in force %p", r.snap, before)
	}
	if h.store.Current() != before {
		t.Errorf("a touch published a new snapshot")
	}
	select {
	case <-published:
		t.Errorf("a touch notified subscribers")
	default:
	}
}

func TestWatchPollsWithoutEvents(t *testing.T) {
	dir := watchPolicyDir(t)
	// An empty store, as on a fresh start: the first load applies.
	h := startWatch(t, dir, NewStore(nil), WatchOptions{PollInterval: 20 * time.Millisecond, noNotify: true})
	h.requireResult(t, 0, 5*time.Second, ReloadApplied)
	before := h.store.Current().Version

	mark := h.mark()
	watchWrite(t, filepath.Join(dir, "app.yaml"), watchAppYAML("list_items", ""))
	h.requireResult(t, mark, 5*time.Second, ReloadApplied)
	if v := h.store.Current().Version; v == before || v != requireDirVersion(t, dir) {
		t.Errorf("version %s, want the new files' version (was %s)", v, before)
	}
}

func TestWatchDirectoryRemovedAndBack(t *testing.T) {
	core, logs := observer.New(zapcore.InfoLevel)
	dir := watchPolicyDir(t)
	h := startWatch(t, dir, nil, WatchOptions{PollInterval: 20 * time.Millisecond, Logger: zap.New(core)})
	good := h.store.Current()

	mark := h.mark()
	if err := os.RemoveAll(dir); err != nil {
		t.Fatal(err)
	}
	h.requireResult(t, mark, 5*time.Second, ReloadRejected)
	if h.store.Current() != good {
		t.Fatalf("removing the directory replaced the snapshot in force")
	}
	// The first refusal may come from a half-removed directory; the next tick sees it gone.
	requireEventually(t, 5*time.Second, "a log saying the directory is gone", func() bool {
		return logs.FilterMessageSnippet("directory is gone").Len() > 0
	})

	mark = h.mark()
	watchWrite(t, filepath.Join(dir, "mesh.yaml"), watchMeshYAML)
	watchWrite(t, filepath.Join(dir, "app.yaml"), watchAppYAML("list_items", ""))
	h.requireResult(t, mark, 5*time.Second, ReloadApplied)
	h.requireVersion(t, 5*time.Second, requireDirVersion(t, dir))
	if st := h.store.Status(); st.LastError != "" {
		t.Errorf("LastError = %q after the directory came back, want none", st.LastError)
	}
}

func TestWatchReturnsOnCancel(t *testing.T) {
	before := runtime.NumGoroutine()
	dir := watchPolicyDir(t)
	h := startWatch(t, dir, nil, WatchOptions{PollInterval: time.Hour})
	h.stop(t)
	// fsnotify's reader goroutine and the ticker are gone too.
	requireEventually(t, 5*time.Second, "goroutines back to where they were", func() bool {
		return runtime.NumGoroutine() <= before
	})
}

func TestWatchSetupError(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "missing")
	err := Watch(context.Background(), NewStore(nil), WatchOptions{Dir: dir})
	if err == nil || !strings.Contains(err.Error(), dir) {
		t.Fatalf("Watch on a missing directory = %v, want an error naming it", err)
	}
}

// A file written in place in several steps is read once it is quiet, not at its first
// write: here the first write stops before the rego line, and with comment lines written
// after it every 15ms the prefix parses all along (a policy without its Rego module, more
// permissive than the old file and the new). Every applied snapshot must have the module.
func TestWatchWaitsForAFileToSettle(t *testing.T) {
	dir := watchPolicyDir(t)
	full := watchAppYAML("get_inventory", "      rego: rego/app.rego\n")
	watchWrite(t, filepath.Join(dir, "rego", "app.rego"), watchRego("rego says no"))
	app := filepath.Join(dir, "app.yaml")
	watchWrite(t, app, full)
	h := startWatch(t, dir, nil, WatchOptions{Debounce: 50 * time.Millisecond})
	if h.store.Current().Apps["inventory"].MCP.Tools.Rego == nil {
		t.Fatal("setup: no Rego module")
	}
	cut := strings.Index(full, "      rego:")
	f, err := os.OpenFile(app, os.O_WRONLY|os.O_TRUNC, 0o644)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := f.WriteString(full[:cut]); err != nil {
		t.Fatal(err)
	}
	for range 20 { // 300ms of writes, each well inside the 50ms window
		time.Sleep(15 * time.Millisecond)
		if _, err := f.WriteString("#\n"); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := f.WriteString(full[cut:]); err != nil {
		t.Fatal(err)
	}
	if err := f.Close(); err != nil {
		t.Fatal(err)
	}
	finished := h.store.Current().Version
	requireEventually(t, 5*time.Second, "the finished file applied", func() bool {
		cur := h.store.Current()
		return cur.Version != finished && cur.Apps["inventory"].MCP.Tools.Rego != nil
	})
	h.mu.Lock()
	defer h.mu.Unlock()
	for _, r := range h.results {
		if r.result == ReloadApplied && r.snap.Apps["inventory"].MCP.Tools.Rego == nil {
			t.Fatalf("a half-written app.yaml was applied (version %s): tool calls decided without the Rego module", r.snap.Version)
		}
	}
}
