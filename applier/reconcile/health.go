package reconcile

import (
	"fmt"
	"sync"
	"time"
)

// progress is the reconciler's heartbeat: what each worker is doing since
// when, and when an item was last finished. Work is small items (one
// container's cgroup files, one listing of the runtime), so a long pass is
// many short items and never looks stuck; one item that does not finish
// is a worker that stopped.
type progress struct {
	mu       sync.Mutex
	busy     map[int]busyItem // by worker
	lastDone time.Time
}

type busyItem struct {
	key   string
	since time.Time
}

func (p *progress) start(w int, key string) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.busy[w] = busyItem{key: key, since: time.Now()}
}

func (p *progress) done(w int) {
	p.mu.Lock()
	defer p.mu.Unlock()
	delete(p.busy, w)
	p.lastDone = time.Now()
}

// Healthy says, for /healthz, whether the reconciler still makes progress:
// an error when a worker has been on one item (a container, a full pass)
// longer than StallAfter, or when items wait and no worker has finished
// one for that long. A runtime that is down does not make it unhealthy:
// its calls fail, and failing items are retried with backoff, which is
// progress; only a call that hangs is not.
func (r *Reconciler) Healthy() error {
	stall := r.StallAfter
	if stall <= 0 {
		stall = DefaultStall
	}
	now := time.Now()
	waiting := r.queue.Len()
	p := &r.progress
	p.mu.Lock()
	defer p.mu.Unlock()
	for w, b := range p.busy {
		if d := now.Sub(b.since); d > stall {
			what := "container " + b.key
			switch b.key {
			case fullKey:
				what = "a full reconcile"
			case diskKey:
				what = "resolving the data disk"
			}
			return fmt.Errorf("reconcile worker %d has been on %s for %s (more than %s): stuck", w, what, d.Round(time.Millisecond), stall)
		}
	}
	if waiting > 0 && len(p.busy) == 0 && !p.lastDone.IsZero() && now.Sub(p.lastDone) > stall {
		return fmt.Errorf("%d reconcile items wait and no worker has finished one for %s (more than %s): stopped", waiting, now.Sub(p.lastDone).Round(time.Millisecond), stall)
	}
	return nil
}
