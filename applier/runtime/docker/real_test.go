package docker_test

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/docker/docker/api/types/container"

	"github.com/kubediskguard/kubediskguard/applier/cgroup"
	"github.com/kubediskguard/kubediskguard/applier/runtime"
	"github.com/kubediskguard/kubediskguard/applier/runtime/docker"
	"github.com/kubediskguard/kubediskguard/hack/runtimetest"
)

const eventTimeout = 10 * time.Second

// create creates a container running busybox sleep, started if start.
func create(t *testing.T, d *runtimetest.Dockerd, labels map[string]string, parent string, start bool) string {
	t.Helper()
	ctx := t.Context()
	resp, err := d.Client.ContainerCreate(ctx,
		&container.Config{Image: runtimetest.Image, Cmd: []string{"/bin/busybox", "sleep", "3600"}, Labels: labels},
		&container.HostConfig{NetworkMode: "none", Resources: container.Resources{CgroupParent: parent}}, nil, nil, "")
	if err != nil {
		t.Fatal(err)
	}
	if start {
		if err := d.Client.ContainerStart(ctx, resp.ID, container.StartOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	return resp.ID
}

func pidOf(t *testing.T, d *runtimetest.Dockerd, id string) int {
	t.Helper()
	info, err := d.Client.ContainerInspect(t.Context(), id)
	if err != nil {
		t.Fatal(err)
	}
	return info.State.Pid
}

func newRuntime(t *testing.T, d *runtimetest.Dockerd, h *cgroup.Hierarchy) *docker.Runtime {
	t.Helper()
	rt, err := docker.New(t.Context(), d.Host, h)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { rt.Close() })
	return rt
}

// TestRealListAndContainer runs, in a private dockerd, a pod's container
// and sandbox, a container without kubelet labels and a created but not
// started pod container, and checks that List and Container see exactly
// the running pod container, with its pod, PID and cgroup.
func TestRealListAndContainer(t *testing.T) {
	d := runtimetest.StartDockerd(t)
	h := runtimetest.Hierarchy(t)
	p := runtimetest.NewPod(t, d, "", "default", "web")

	app := create(t, d, p.DockerLabels("app"), p.Cgroup, true)
	sandbox := create(t, d, p.DockerLabels(""), p.Cgroup, true)
	plain := create(t, d, nil, "", true)
	created := create(t, d, p.DockerLabels("init"), p.Cgroup, false)

	rt := newRuntime(t, d, h)
	if rt.Driver() != cgroup.Cgroupfs {
		t.Errorf("Driver() = %v, want cgroupfs (no systemd here)", rt.Driver())
	}
	ctx := t.Context()
	want := runtime.Container{
		ID: app, PodUID: p.UID, PodNamespace: "default", PodName: "web", Name: "app",
		PID: pidOf(t, d, app), CgroupDir: h.Join(p.Cgroup + "/" + app),
	}

	// The cgroup the runtime gives is the one the kernel has the process in.
	runtimetest.CheckListed(ctx, t, rt, h, want)
	if got, err := rt.Container(ctx, app[:12]); err != nil || got != want {
		t.Errorf("Container(short ID) = %+v, %v; want %+v", got, err, want)
	}
	wantCreated := runtime.Container{
		ID: created, PodUID: p.UID, PodNamespace: "default", PodName: "web", Name: "init",
		CgroupDir: h.Join(p.Cgroup + "/" + created),
	}
	if got, err := rt.Container(ctx, created); err != nil || got != wantCreated {
		t.Errorf("Container(created, not started) = %+v, %v; want %+v", got, err, wantCreated)
	}
	for name, tc := range map[string]struct {
		id   string
		want error
	}{
		"sandbox":                          {sandbox, runtime.ErrNotKubernetes},
		"container without kubelet labels": {plain, runtime.ErrNotKubernetes},
		"unknown container":                {"0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef", runtime.ErrNotFound},
	} {
		if _, err := rt.Container(ctx, tc.id); !errors.Is(err, tc.want) {
			t.Errorf("Container(%s) error = %v, want %v", name, err, tc.want)
		}
	}

	// Once its process is gone, the container is no longer listed, and
	// Container has no PID for it.
	if err := d.Client.ContainerKill(ctx, app, "KILL"); err != nil {
		t.Fatal(err)
	}
	waitC, errC := d.Client.ContainerWait(ctx, app, container.WaitConditionNotRunning)
	select {
	case <-waitC:
	case err := <-errC:
		t.Fatal(err)
	}
	if list, err := rt.List(ctx); err != nil || len(list) != 0 {
		t.Errorf("List after the process exited = %+v, %v; want none", list, err)
	}
	wantExited := want
	wantExited.PID = 0
	if got, err := rt.Container(ctx, app); err != nil || got != wantExited {
		t.Errorf("Container(app) after exit = %+v, %v; want %+v", got, err, wantExited)
	}
}

// TestRealWatch follows a pod container through its lifecycle in a
// private dockerd, checking each event and how soon it came.
func TestRealWatch(t *testing.T) {
	d := runtimetest.StartDockerd(t)
	h := runtimetest.Hierarchy(t)
	p := runtimetest.NewPod(t, d, "", "default", "web")
	rt := newRuntime(t, d, h)
	ctx, cancel := context.WithCancel(t.Context())
	defer cancel()

	// Events from before Watch are not replayed.
	old := create(t, d, p.DockerLabels("old"), p.Cgroup, false)
	if err := d.Client.ContainerRemove(ctx, old, container.RemoveOptions{}); err != nil {
		t.Fatal(err)
	}

	start := time.Now()
	w := runtimetest.Watch(ctx, rt)
	at, err := w.Subscribed(t, eventTimeout)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("subscribed in %s", at.Sub(start).Round(time.Microsecond))

	var id string
	steps := []struct {
		name string
		do   func()
		want runtime.EventKind
	}{
		{"create", func() { id = create(t, d, p.DockerLabels("app"), p.Cgroup, false) }, runtime.Created},
		{"start", func() {
			if err := d.Client.ContainerStart(ctx, id, container.StartOptions{}); err != nil {
				t.Fatal(err)
			}
		}, runtime.Started},
		{"kill", func() {
			if err := d.Client.ContainerKill(ctx, id, "KILL"); err != nil {
				t.Fatal(err)
			}
		}, runtime.Exited},
		{"remove", func() {
			if err := d.Client.ContainerRemove(ctx, id, container.RemoveOptions{}); err != nil {
				t.Fatal(err)
			}
		}, runtime.Deleted},
	}
	for _, s := range steps {
		start := time.Now()
		s.do()
		ev := w.Next(t, eventTimeout)
		if ev.Kind != s.want || ev.ContainerID != id || ev.PID != 0 {
			t.Fatalf("%s: got event %+v, want %s %s without a PID", s.name, ev.Event, s.want, id)
		}
		t.Logf("%-6s -> %-7s after %s", s.name, ev.Kind, ev.At.Sub(start).Round(time.Microsecond))
	}
	w.Quiet(t, 200*time.Millisecond)

	cancel()
	if err := w.Done(t, eventTimeout); err != nil {
		t.Errorf("Watch returned %v after its context was canceled, want nil", err)
	}
}

// TestRealWatchReconnect kills dockerd under a running Watch, which must
// return an error, restarts it on the same directories, and checks that
// Watch, called again as the caller's backoff would, gets events.
func TestRealWatchReconnect(t *testing.T) {
	d := runtimetest.StartDockerd(t)
	h := runtimetest.Hierarchy(t)
	p := runtimetest.NewPod(t, d, "", "default", "web")
	rt := newRuntime(t, d, h)
	ctx := t.Context()

	w := runtimetest.Watch(ctx, rt)
	if _, err := w.Subscribed(t, eventTimeout); err != nil {
		t.Fatal(err)
	}
	killed := time.Now()
	d.Kill(t)
	err := w.Done(t, eventTimeout)
	if err == nil {
		t.Fatal("Watch returned nil when dockerd was killed, want an error")
	}
	t.Logf("Watch returned %s after SIGKILL: %v", time.Since(killed).Round(time.Microsecond), err)

	start := time.Now()
	if err := rt.Watch(ctx, func() {}, func(runtime.Event) {}); err == nil {
		t.Fatal("Watch returned nil while dockerd is down")
	}
	t.Logf("Watch while dockerd is down failed in %s", time.Since(start).Round(time.Microsecond))

	d.Start(t)
	restarted := time.Now()
	attempts := 0
	for {
		attempts++
		w = runtimetest.Watch(ctx, rt)
		if _, err := w.Subscribed(t, eventTimeout); err == nil {
			break
		} else if time.Since(restarted) > 30*time.Second {
			t.Fatalf("Watch still fails %s after dockerd restarted: %v", time.Since(restarted), err)
		}
		time.Sleep(100 * time.Millisecond) // the caller's backoff
	}
	t.Logf("Watch subscribed again %s after dockerd answered, at attempt %d", time.Since(restarted).Round(time.Millisecond), attempts)

	id := create(t, d, p.DockerLabels("app"), p.Cgroup, false)
	if ev := w.Next(t, eventTimeout); ev.Kind != runtime.Created || ev.ContainerID != id {
		t.Fatalf("after the restart: got event %s %s, want created %s", ev.Kind, ev.ContainerID, id)
	}
}
