package policy

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/fsnotify/fsnotify"
	"go.uber.org/zap"
)

// Results of a reload attempt, passed to WatchOptions.OnReload; they double as metric labels.
const (
	ReloadApplied   = "applied"   // a new snapshot was published
	ReloadUnchanged = "unchanged" // the files hash to the version in force; nothing published
	ReloadRejected  = "rejected"  // the files do not load; the snapshot in force keeps serving
)

// DefaultDebounce is how long Watch gathers events before it reloads.
const DefaultDebounce = 100 * time.Millisecond

// WatchOptions configures Watch.
type WatchOptions struct {
	Dir string
	// Debounce is how long events are gathered before one reload (default 100ms): editors
	// write a file in several steps, and a ConfigMap update is several renames.
	Debounce time.Duration
	// PollInterval, when > 0, also reloads on a timer, for file systems where inotify
	// misses events (NFS, some bind mounts). Default 0: off.
	PollInterval time.Duration
	// Logger defaults to zap.NewNop().
	Logger *zap.Logger
	// OnReload is called after every reload attempt (for metrics) with the result, the
	// snapshot in force afterwards (nil if none) and, when rejected, the load error.
	OnReload func(result string, snap *Snapshot, err error)
	// Load defaults to LoadDir; tests may wrap it to count loads.
	Load func(ctx context.Context, dir string) (*Snapshot, error)

	// noNotify turns fsnotify off, so tests can show that polling alone sees a change.
	noNotify bool
}

// Watch watches opts.Dir and reloads into store until ctx is done. It returns an error
// only if the watch cannot be set up; load errors never stop it.
//
// It loads once as soon as the watch is in place (so a change made between the caller's
// own load and the watch is not missed), then again after every burst of file events and,
// if PollInterval is set, on every tick. A load that fails is recorded with
// store.SetError and logged; the snapshot in force keeps serving.
func Watch(ctx context.Context, store *Store, opts WatchOptions) error {
	if opts.Debounce <= 0 {
		opts.Debounce = DefaultDebounce
	}
	if opts.Logger == nil {
		opts.Logger = zap.NewNop()
	}
	if opts.Load == nil {
		opts.Load = LoadDir
	}
	w := &watcher{store: store, opts: opts, log: opts.Logger.With(zap.String("dir", opts.Dir))}

	// Watch the directory, not the files: editors save by writing a temporary file and
	// renaming it over the original, and a ConfigMap volume swaps its "..data" symlink, so a
	// watch on a file would follow an inode that is no longer the policy.
	var events <-chan fsnotify.Event
	var errs <-chan error
	if !opts.noNotify {
		fw, err := fsnotify.NewWatcher()
		if err != nil {
			return fmt.Errorf("watch policy directory %s: %w", opts.Dir, err)
		}
		// Close waits for fsnotify's reader goroutine, so nothing outlives Watch.
		defer fw.Close()
		if err := fw.Add(opts.Dir); err != nil {
			return fmt.Errorf("watch policy directory %s: %w", opts.Dir, err)
		}
		w.fw = fw
		events, errs = fw.Events, fw.Errors
	}
	var tick <-chan time.Time
	if opts.PollInterval > 0 {
		t := time.NewTicker(opts.PollInterval)
		defer t.Stop()
		tick = t.C
	}

	w.reload(ctx)
	// debounce is nil when no reload is pending. Each event restarts the window, so a file
	// written in several steps (kubectl cp, scp, an editor that truncates and rewrites in
	// place) is read once it is quiet, not at its first write, where a prefix that happens
	// to parse (a policy without its rego or redact lines) would be applied. The window
	// never reaches past maxWait after the first event, so a file rewritten all the time
	// cannot starve reloads.
	var debounce <-chan time.Time
	var first time.Time
	maxWait := 10 * opts.Debounce
	pending := func() {
		now := time.Now()
		if debounce == nil {
			first = now
		}
		wait := opts.Debounce
		if rest := first.Add(maxWait).Sub(now); rest < wait {
			wait = max(rest, 0)
		}
		debounce = time.After(wait)
	}
	for {
		select {
		case <-ctx.Done():
			return nil
		case ev, ok := <-events:
			if !ok {
				events = nil
				continue
			}
			w.log.Debug("policy directory event", zap.String("event", ev.String()))
			pending()
		case err, ok := <-errs:
			if !ok {
				errs = nil
				continue
			}
			// Typically an inotify queue overflow: events were lost, so reload to be sure.
			w.log.Warn("policy directory watch error", zap.Error(err))
			if debounce == nil {
				pending()
			}
		case <-debounce:
			debounce = nil
			w.reload(ctx)
		case <-tick:
			w.reload(ctx)
		}
	}
}

// watcher is the state of one Watch loop; only the loop goroutine touches it.
type watcher struct {
	store *Store
	opts  WatchOptions
	log   *zap.Logger
	fw    *fsnotify.Watcher // nil when fsnotify is off
	// rejected is the last refusal logged at error level, so that polling a directory
	// that stays broken does not log the same problems on every tick.
	rejected string
}

// reload loads the directory and publishes the result: applied, unchanged or rejected.
func (w *watcher) reload(ctx context.Context) {
	w.syncWatches()
	snap, err := w.opts.Load(ctx, w.opts.Dir)
	if ctx.Err() != nil {
		return // shutting down: a cancelled load says nothing about the files
	}
	cur := w.store.Current()
	switch {
	case err != nil:
		w.store.SetError(err)
		w.logRejected(err)
		w.report(ReloadRejected, cur, err)
	case cur != nil && snap.Version == cur.Version:
		// The files hash to the snapshot in force (a touch, an editor's temporary file, a
		// bad edit undone): publishing would only make every Envoy re-apply the same thing.
		// Still clear a refusal recorded since, as the files on disk are good again.
		if w.store.Status().LastError != "" {
			w.store.SetError(nil)
			w.log.Info("policy files are valid again; policy in force unchanged", zap.String("version", cur.Version))
		}
		w.rejected = ""
		w.report(ReloadUnchanged, cur, nil)
	default:
		w.store.Set(snap)
		w.rejected = ""
		old := ""
		if cur != nil {
			old = cur.Version
		}
		w.log.Info("policy applied",
			zap.String("old_version", old),
			zap.String("new_version", snap.Version),
			zap.Strings("files", snap.Files))
		w.report(ReloadApplied, snap, nil)
	}
}

func (w *watcher) report(result string, snap *Snapshot, err error) {
	if w.opts.OnReload != nil {
		w.opts.OnReload(result, snap, err)
	}
}

// logRejected logs a refused load: each problem as an element of an array field
// ("file:line: message"), never the contents of the files.
func (w *watcher) logRejected(err error) {
	msg := "policy rejected; keeping the policy in force"
	if _, serr := os.Stat(w.opts.Dir); errors.Is(serr, fs.ErrNotExist) {
		msg = "policy directory is gone; keeping the policy in force"
		if w.opts.PollInterval <= 0 {
			msg += " (without a poll interval it is not watched again if it comes back)"
		}
	}
	var fields []zap.Field
	var le *LoadError
	if errors.As(err, &le) {
		probs := make([]string, len(le.Problems))
		for i, p := range le.Problems {
			probs[i] = p.Error()
		}
		fields = append(fields, zap.Strings("problems", probs))
	} else {
		fields = append(fields, zap.Error(err))
	}
	if cur := w.store.Current(); cur != nil {
		fields = append(fields, zap.String("version", cur.Version))
	}
	level := zap.ErrorLevel
	if err.Error() == w.rejected {
		level = zap.DebugLevel
	}
	w.rejected = err.Error()
	w.log.Log(level, msg, fields...)
}

// syncWatches (re)adds the watches on the directory and its immediate subdirectories (Rego
// modules live in e.g. rego/). It runs before every load, so a subdirectory created since
// is watched before its files are read, and a directory that was removed and came back is
// watched again (inotify drops a watch when its directory goes). Re-adding a watch that
// exists is a no-op.
func (w *watcher) syncWatches() {
	if w.fw == nil {
		return
	}
	dir := w.opts.Dir
	if err := w.fw.Add(dir); err != nil {
		return // the directory is gone or unreadable: the load says so
	}
	entries, err := os.ReadDir(dir)
	if err != nil {
		return
	}
	for _, e := range entries {
		// Dot entries are skipped like the loader skips them: a ConfigMap's "..data" and
		// "..<timestamp>" directories change only through a symlink swap in dir itself,
		// which the watch on dir sees; and a .git directory would only add noise.
		if strings.HasPrefix(e.Name(), ".") {
			continue
		}
		p := filepath.Join(dir, e.Name())
		if !e.IsDir() {
			// A symlink to a directory (a ConfigMap's rego -> ..data/rego) counts.
			if e.Type()&fs.ModeSymlink == 0 {
				continue
			}
			if info, err := os.Stat(p); err != nil || !info.IsDir() {
				continue
			}
		}
		if err := w.fw.Add(p); err != nil && !errors.Is(err, fs.ErrNotExist) {
			w.log.Warn("cannot watch policy subdirectory", zap.String("subdir", p), zap.Error(err))
		}
	}
}
