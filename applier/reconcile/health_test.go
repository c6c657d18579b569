package reconcile

import (
	"context"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"

	"github.com/kubediskguard/kubediskguard/applier/runtime"
	"github.com/kubediskguard/kubediskguard/shared/limits"
)

// gatedRuntime is a fake runtime whose List waits for its gate.
type gatedRuntime struct {
	*fakeRuntime
	gate chan struct{}
}

func (g gatedRuntime) List(ctx context.Context) ([]runtime.Container, error) {
	select {
	case <-g.gate:
	case <-ctx.Done():
		return nil, ctx.Err()
	}
	return g.fakeRuntime.List(ctx)
}

// slowPods is a Pods each of whose lookups takes delay: every container's
// reconcile takes that long.
type slowPods struct {
	Pods
	delay time.Duration
}

func (s slowPods) Pod(uid string) (*corev1.Pod, bool) {
	time.Sleep(s.delay)
	return s.Pods.Pod(uid)
}

func TestHealthy(t *testing.T) {
	const stall = 300 * time.Millisecond

	t.Run("a full pass stuck in the runtime makes it unhealthy, and healthy again once it moves", func(t *testing.T) {
		gate := make(chan struct{})
		f := newFixtureWith(t, 0, "", func(c *Config) {
			c.Runtime, c.StallAfter = gatedRuntime{c.Runtime.(*fakeRuntime), gate}, stall
		})
		if err := f.r.Healthy(); err != nil {
			t.Fatalf("Healthy() = %v at once, want nil", err)
		}
		deadline := time.Now().Add(5 * time.Second)
		var err error
		for err == nil && time.Now().Before(deadline) {
			time.Sleep(20 * time.Millisecond)
			err = f.r.Healthy()
		}
		if err == nil || !strings.Contains(err.Error(), "a full reconcile") || !strings.Contains(err.Error(), "stuck") {
			t.Fatalf("Healthy() = %v with the full pass stuck, want an error saying so", err)
		}
		t.Logf("Healthy() with the runtime's List hanging: %v", err)
		close(gate)
		f.waitSynced()
		if err := f.r.Healthy(); err != nil {
			t.Errorf("Healthy() = %v after the pass completed", err)
		}
	})

	t.Run("a long pass of many quick containers stays healthy", func(t *testing.T) {
		const n, each = 24, 40 * time.Millisecond // 24 × 40 ms on 2 workers: 480 ms > stall
		f := newFixtureWith(t, 0, "", func(c *Config) {
			c.Pods, c.StallAfter = slowPods{c.Pods, each}, stall
		})
		f.waitSynced()
		for i := range n {
			uid := "u" + string(rune('a'+i))
			f.pods.set(pod(uid, limits.Resolved{"app": {ReadIOPS: 100}}))
			f.container("c"+uid, uid, "app", 10+i)
		}
		start := time.Now()
		f.r.queue.Add(fullKey)
		time.Sleep(10 * time.Millisecond)
		for f.r.queue.Len() > 0 || f.busy() {
			if err := f.r.Healthy(); err != nil {
				t.Fatalf("Healthy() = %v %s into a progressing pass", err, time.Since(start).Round(time.Millisecond))
			}
			time.Sleep(10 * time.Millisecond)
		}
		if took := time.Since(start); took < stall {
			t.Fatalf("the pass took %s, less than the stall time %s: the test proves nothing", took, stall)
		} else {
			t.Logf("a pass of %d containers took %s (stall time %s), healthy throughout", n, took.Round(time.Millisecond), stall)
		}
	})
}

// busy reports whether a worker is on an item.
func (f *fixture) busy() bool {
	f.r.progress.mu.Lock()
	defer f.r.progress.mu.Unlock()
	return len(f.r.progress.busy) > 0
}
