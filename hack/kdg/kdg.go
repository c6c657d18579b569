// Package kdg runs KubeDiskGuard's two built binaries against the local
// cluster of hack/cluster as a deployment would configure them, and reads
// fio's results from a pod's log. `make demo` (hack/demo) and the
// end-to-end test (hack/e2e) share it.
package kdg

import (
	"bufio"
	"bytes"
	"context"
	"crypto/rand"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	admissionv1 "k8s.io/api/admissionregistration/v1"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/client-go/kubernetes"
	"sigs.k8s.io/yaml"

	"github.com/kubediskguard/kubediskguard/certs/pki"
	"github.com/kubediskguard/kubediskguard/hack/cluster"
)

// Proc is a binary started by Start. Its start time (cluster.Proc) makes
// sure a recycled PID is never signalled.
type Proc struct {
	cluster.Proc
	Log     string `json:"log"`
	exited  chan struct{}
	waitErr error // how it exited (cmd.Wait's error), once exited is closed
}

// Start runs bin with env added to this process's, its output in logFile,
// in its own process group (a Ctrl-C reaches the caller, which stops it).
func Start(bin, logFile string, env []string, args ...string) (*Proc, error) {
	logf, err := os.Create(logFile)
	if err != nil {
		return nil, err
	}
	defer logf.Close()
	cmd := exec.Command(bin, args...)
	cmd.Env = append(os.Environ(), env...)
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := cmd.Start(); err != nil {
		return nil, err
	}
	p := &Proc{
		Proc: cluster.Proc{Name: filepath.Base(bin), PID: cmd.Process.Pid, StartTime: cluster.StartTime(cmd.Process.Pid)},
		Log:  logFile, exited: make(chan struct{}),
	}
	go func() { p.waitErr = cmd.Wait(); close(p.exited) }()
	return p, nil
}

// ExitErr is how p exited: nil for status 0, else the exit status or the
// signal that ended it. It is nil while p runs, and for an adopted p.
func (p *Proc) ExitErr() error {
	select {
	case <-p.exited:
		if p.waitErr != nil {
			return fmt.Errorf("%s (pid %d): %w", p.Name, p.PID, p.waitErr)
		}
	default:
	}
	return nil
}

// Adopt makes p, read back from a file an earlier process wrote, stoppable.
func Adopt(p *Proc) {
	p.exited = make(chan struct{})
	go func() {
		for p.Alive() {
			time.Sleep(100 * time.Millisecond)
		}
		close(p.exited)
	}()
}

// Stop sends SIGTERM, then SIGKILL after 10 s, and waits for p to exit.
func (p *Proc) Stop() { p.signal(syscall.SIGTERM, 10*time.Second) }

// Kill sends SIGKILL and waits for p to exit.
func (p *Proc) Kill() { p.signal(syscall.SIGKILL, 10*time.Second) }

func (p *Proc) signal(sig syscall.Signal, grace time.Duration) {
	if !p.Alive() {
		return
	}
	syscall.Kill(p.PID, sig)
	select {
	case <-p.exited:
	case <-time.After(grace):
		syscall.Kill(p.PID, syscall.SIGKILL)
		<-p.exited
	}
}

// WaitReady polls http://probe/readyz until p answers 200.
func (p *Proc) WaitReady(ctx context.Context, probe string) error {
	httpc := &http.Client{Timeout: 2 * time.Second}
	err := cluster.Poll(ctx, p.Name+" ready (/readyz)", 200*time.Millisecond, 60*time.Second, func() error {
		resp, err := httpc.Get("http://" + probe + "/readyz")
		if err == nil {
			b, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return nil
			}
			err = fmt.Errorf("%d %s", resp.StatusCode, strings.TrimSpace(string(b)))
		}
		select {
		case <-p.exited:
			return cluster.Final(fmt.Errorf("exited at start (%v)", err))
		default:
			return err
		}
	})
	if err != nil {
		return fmt.Errorf("%w; its log:\n%s", err, Tail(p.Log, 20))
	}
	return nil
}

// Webhook is a running kubediskguard-webhook.
type Webhook struct {
	*Proc
	URL   string // of /mutate-v1-pod
	CA    *pki.CA
	bin   string
	args  []string
	probe string
}

// StartWebhook serves the webhook on a free local port with a certificate
// for 127.0.0.1 signed by the cluster CA (written to certDir), and waits
// until it is ready.
func StartWebhook(ctx context.Context, c *cluster.Cluster, bin, certDir, logFile string) (*Webhook, error) {
	ca := c.CA()
	serving, err := ca.Issue([]string{"127.0.0.1", "localhost"}, 24*time.Hour)
	if err != nil {
		return nil, err
	}
	if err := pki.WriteDir(certDir, serving, ca); err != nil {
		return nil, err
	}
	ports, err := FreePorts(3)
	if err != nil {
		return nil, err
	}
	w := &Webhook{
		URL:   fmt.Sprintf("https://127.0.0.1:%d/mutate-v1-pod", ports[0]),
		CA:    ca,
		bin:   bin,
		probe: fmt.Sprintf("127.0.0.1:%d", ports[2]),
		args: []string{
			"--kubeconfig=" + c.Kubeconfig,
			"--cert-dir=" + certDir,
			fmt.Sprintf("--port=%d", ports[0]),
			fmt.Sprintf("--metrics-bind-address=127.0.0.1:%d", ports[1]),
		},
	}
	w.args = append(w.args, "--health-probe-bind-address="+w.probe)
	w.Proc = &Proc{Log: logFile}
	return w, w.Restart(ctx)
}

// Restart starts the webhook again, same ports and certificate, after it was
// stopped or killed, and waits until it is ready.
func (w *Webhook) Restart(ctx context.Context) error {
	w.Proc.Stop()
	p, err := Start(w.bin, w.Proc.Log, nil, w.args...)
	if err != nil {
		return err
	}
	w.Proc = p
	return p.WaitReady(ctx, w.probe)
}

// Register applies the MutatingWebhookConfiguration in manifest with its
// clientConfig pointed at w (url + the cluster CA as caBundle: there is no
// kube-proxy to reach a Service). The applied YAML is written to out.
func (w *Webhook) Register(ctx context.Context, c *cluster.Cluster, manifest, out string) error {
	raw, err := os.ReadFile(manifest)
	if err != nil {
		return err
	}
	var mwc admissionv1.MutatingWebhookConfiguration
	if err := yaml.UnmarshalStrict(raw, &mwc); err != nil {
		return fmt.Errorf("%s: %w", manifest, err)
	}
	url := w.URL
	for i := range mwc.Webhooks {
		mwc.Webhooks[i].ClientConfig = admissionv1.WebhookClientConfig{URL: &url, CABundle: w.CA.PEM}
	}
	b, err := yaml.Marshal(&mwc)
	if err != nil {
		return err
	}
	if err := os.WriteFile(out, b, 0o644); err != nil {
		return err
	}
	_, err = c.Kubectl(ctx, "apply", "-f", out)
	return err
}

// StartApplier runs the applier as the DaemonSet would: this node, the
// cluster's containerd, dataMount as DATA_MOUNT, plus env; and waits until
// it is ready.
func StartApplier(ctx context.Context, c *cluster.Cluster, bin, dataMount, logFile string, env ...string) (*Proc, error) {
	ports, err := FreePorts(2)
	if err != nil {
		return nil, err
	}
	probe := fmt.Sprintf("127.0.0.1:%d", ports[1])
	env = applierEnv(c, dataMount, env)
	p, err := Start(bin, logFile, env,
		fmt.Sprintf("--metrics-bind-address=127.0.0.1:%d", ports[0]),
		"--health-probe-bind-address="+probe)
	if err != nil {
		return nil, err
	}
	if err := p.WaitReady(ctx, probe); err != nil {
		p.Stop()
		return nil, err
	}
	return p, nil
}

// ResetNode runs `kubediskguard-applier reset` with the settings
// StartApplier gives the applier (plus env), and returns what it printed.
func ResetNode(ctx context.Context, c *cluster.Cluster, bin, dataMount string, env ...string) (string, error) {
	cmd := exec.CommandContext(ctx, bin, "reset")
	cmd.Env = append(os.Environ(), applierEnv(c, dataMount, env)...)
	out, err := cmd.CombinedOutput()
	if err != nil {
		return string(out), fmt.Errorf("%s reset: %w\n%s", bin, err, out)
	}
	return string(out), nil
}

// applierEnv is the applier's environment on the cluster's node: its
// settings, dataMount as DATA_MOUNT, then env.
//
// DATA_ALLOW_ROOT_DISK=true: the data directories of the demo and the
// end-to-end tests are directories on the root disk (until hack/cluster
// gives the node a data disk of its own), which the applier otherwise
// waits for as not a data disk.
func applierEnv(c *cluster.Cluster, dataMount string, env []string) []string {
	return append(append(c.Env(), "DATA_MOUNT="+dataMount, "DATA_ALLOW_ROOT_DISK=true"), env...)
}

// WriteDataFile writes mib MiB of random data to path and syncs it, from
// this process: outside any throttled cgroup, and with real blocks (reads of
// never-written extents would not reach the disk).
func WriteDataFile(path string, mib int) error {
	f, err := os.Create(path)
	if err != nil {
		return err
	}
	buf := make([]byte, 1<<20)
	for i := 0; i < mib; i++ {
		rand.Read(buf)
		if _, err := f.Write(buf); err != nil {
			f.Close()
			return err
		}
	}
	if err := f.Sync(); err != nil {
		f.Close()
		return err
	}
	return f.Close()
}

// FioRun is one fio run a pod's container logged between "=== fio run N"
// and "=== end of fio run N" (fio --output-format=json).
type FioRun struct {
	N         int
	Start     time.Time
	ReadIOPS  float64 // summed over fio's jobs
	WriteIOPS float64
}

// FioRuns parses the container's log into its fio runs.
func FioRuns(ctx context.Context, client kubernetes.Interface, pod *corev1.Pod, container string) ([]FioRun, error) {
	b, err := client.CoreV1().Pods(pod.Namespace).GetLogs(pod.Name, &corev1.PodLogOptions{Container: container}).DoRaw(ctx)
	if err != nil {
		return nil, fmt.Errorf("reading the log of %s/%s %s: %w", pod.Namespace, pod.Name, container, err)
	}
	var runs []FioRun
	var cur *bytes.Buffer
	n := 0
	sc := bufio.NewScanner(bytes.NewReader(b))
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for sc.Scan() {
		line := sc.Text()
		switch {
		case strings.HasPrefix(line, "=== fio run "):
			n, _ = strconv.Atoi(strings.TrimPrefix(line, "=== fio run "))
			cur = &bytes.Buffer{}
		case strings.HasPrefix(line, "=== end of fio run ") && cur != nil:
			var out struct {
				TimestampMS int64 `json:"timestamp_ms"`
				Jobs        []struct {
					Error      int   `json:"error"`
					JobRuntime int64 `json:"job_runtime"`
					Read       struct {
						IOPS float64 `json:"iops"`
					} `json:"read"`
					Write struct {
						IOPS float64 `json:"iops"`
					} `json:"write"`
				} `json:"jobs"`
			}
			js := cur.Bytes()
			if i := bytes.IndexByte(js, '{'); i >= 0 {
				js = js[i:] // fio may print notes before its JSON
			}
			if err := json.NewDecoder(bytes.NewReader(js)).Decode(&out); err != nil || len(out.Jobs) == 0 {
				return nil, fmt.Errorf("fio run %d in %s/%s %s: no fio JSON (%v): %s", n, pod.Namespace, pod.Name, container, err, strings.TrimSpace(cur.String()))
			}
			r := FioRun{N: n}
			for _, j := range out.Jobs {
				if j.Error != 0 {
					return nil, fmt.Errorf("fio run %d in %s/%s %s failed: error %d", n, pod.Namespace, pod.Name, container, j.Error)
				}
				r.ReadIOPS += j.Read.IOPS
				r.WriteIOPS += j.Write.IOPS
			}
			// timestamp_ms is when fio finished.
			r.Start = time.UnixMilli(out.TimestampMS - out.Jobs[0].JobRuntime)
			runs = append(runs, r)
			cur = nil
		case cur != nil:
			cur.WriteString(line + "\n")
		}
	}
	return runs, nil
}

// NextRun waits up to timeout for the container's first fio run that
// started at since or later, and returns it.
func NextRun(ctx context.Context, client kubernetes.Interface, pod *corev1.Pod, container string, since time.Time, timeout time.Duration) (FioRun, error) {
	var run FioRun
	err := cluster.Poll(ctx, fmt.Sprintf("a fio run in %s/%s %s started after %s", pod.Namespace, pod.Name, container, since.Format(time.TimeOnly)),
		500*time.Millisecond, timeout, func() error {
			runs, err := FioRuns(ctx, client, pod, container)
			if err != nil {
				return cluster.Final(err)
			}
			for _, r := range runs {
				if !r.Start.Before(since) {
					run = r
					return nil
				}
			}
			return fmt.Errorf("%d runs so far", len(runs))
		})
	return run, err
}

// FreePorts returns n free local TCP ports.
func FreePorts(n int) ([]int, error) {
	var ports []int
	var ls []net.Listener
	defer func() {
		for _, l := range ls {
			l.Close()
		}
	}()
	for range n {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			return nil, err
		}
		ls = append(ls, l)
		ports = append(ports, l.Addr().(*net.TCPAddr).Port)
	}
	return ports, nil
}

// Tail is the last n lines of file, indented.
func Tail(file string, n int) string {
	b, _ := os.ReadFile(file)
	lines := strings.Split(strings.TrimRight(string(b), "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return "    " + strings.ReplaceAll(strings.Join(lines, "\n"), "\n", "\n    ")
}
