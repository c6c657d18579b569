// Package kdg runs KubeDiskGuard's two built binaries on the node of the
// local cluster of hack/cluster (through its cluster.Node, whatever the node
// kind) as a deployment would configure them, runs other programs on this
// host (Start: cert-manager), and reads fio's results from a pod's log. `make demo` (hack/demo) and the
// end-to-end test (hack/e2e) share it.
package kdg

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	admissionv1 "k8s.io/api/admissionregistration/v1"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
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

// Stop sends SIGTERM, then SIGKILL after 10 s, and waits for p to exit.
func (p *Proc) Stop() { p.signal(syscall.SIGTERM, 10*time.Second) }

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
	return waitReady(ctx, p.Name, 60*time.Second, func() (int, []byte, error) {
		resp, err := httpc.Get("http://" + probe + "/readyz")
		if err != nil {
			return 0, nil, err
		}
		defer resp.Body.Close()
		b, err := io.ReadAll(resp.Body)
		return resp.StatusCode, b, err
	}, func() bool {
		select {
		case <-p.exited:
			return true
		default:
			return false
		}
	}, func() string { return Tail(p.Log, 20) })
}

// waitReady polls get (a GET of /readyz) until it answers 200, for up to
// timeout, and fails at once when exited says the process is gone, with the
// tail of its log.
func waitReady(ctx context.Context, name string, timeout time.Duration, get func() (int, []byte, error), exited func() bool, tail func() string) error {
	err := cluster.Poll(ctx, name+" ready (/readyz)", 200*time.Millisecond, timeout, func() error {
		status, b, err := get()
		if err == nil {
			if status == http.StatusOK {
				return nil
			}
			err = fmt.Errorf("%d %s", status, strings.TrimSpace(string(b)))
		}
		if exited() {
			return cluster.Final(fmt.Errorf("exited at start (%v)", err))
		}
		return err
	})
	if err != nil {
		return fmt.Errorf("%w; its log:\n%s", err, tail())
	}
	return nil
}

// NodeProc is one of KubeDiskGuard's binaries running on the cluster's node
// (cluster.Node.Start); Down stops it if it still runs.
type NodeProc struct {
	Proc  cluster.Proc // on the node: its PID is the node's (not embedded: Proc.Alive looks at this host)
	Log   string       // on the node
	node  cluster.Node
	ready time.Duration // how long WaitReady waits (cluster.ReadyTimeout)
}

// StartOnNode starts spec on the cluster's node (its log is
// cluster.LogPath(node, spec.Name)).
func StartOnNode(ctx context.Context, c *cluster.Cluster, spec cluster.ProcSpec) (*NodeProc, error) {
	p, err := c.Node.Start(ctx, spec)
	if err != nil {
		return nil, fmt.Errorf("starting %s on the node: %w", spec.Name, err)
	}
	return &NodeProc{Proc: p, Log: cluster.LogPath(c.Node, spec.Name), node: c.Node, ready: c.ReadyTimeout()}, nil
}

// Running reports whether p still runs on its node.
func (p *NodeProc) Running(ctx context.Context) bool { return cluster.ProcAlive(ctx, p.node, p.Proc) }

// Stop sends SIGTERM, then SIGKILL after 10 s, and waits for p to exit.
func (p *NodeProc) Stop(ctx context.Context) {
	cluster.StopProc(ctx, p.node, p.Proc, false, 10*time.Second)
}

// Kill sends SIGKILL and waits for p to exit.
func (p *NodeProc) Kill(ctx context.Context) {
	cluster.StopProc(ctx, p.node, p.Proc, true, 10*time.Second)
}

// ReadLog is p's log so far.
func (p *NodeProc) ReadLog(ctx context.Context) (string, error) {
	b, err := p.node.ReadFile(ctx, p.Log)
	return string(b), err
}

// Tail is the last n lines of p's log, indented.
func (p *NodeProc) Tail(ctx context.Context, n int) string {
	log, err := p.ReadLog(ctx)
	if err != nil {
		return "    (" + err.Error() + ")"
	}
	return tailLines(log, n)
}

// WaitReady polls http://127.0.0.1:port/readyz on the node until p answers
// 200, for as long as the cluster's node kind allows (cluster.ReadyTimeout).
func (p *NodeProc) WaitReady(ctx context.Context, port int) error {
	return waitReady(ctx, p.Proc.Name, p.ready, func() (int, []byte, error) {
		return p.node.HTTPGet(ctx, net.JoinHostPort("127.0.0.1", strconv.Itoa(port)), "/readyz")
	},
		func() bool { return !p.Running(ctx) }, func() string { return p.Tail(ctx, 20) })
}

// Webhook is a running kubediskguard-webhook on the cluster's node.
type Webhook struct {
	*NodeProc
	URL   string // of /mutate-v1-pod, as the apiserver reaches it
	CA    *pki.CA
	c     *cluster.Cluster
	spec  cluster.ProcSpec
	probe int // port of /readyz
}

// WebhookName is the name (and log name) of the webhook's process on the node.
const WebhookName = "kubediskguard-webhook"

// StartWebhook serves the webhook bin on the node on free loopback ports,
// with a certificate for 127.0.0.1 signed by the cluster CA (in the node's
// Dir/kdg/webhook-certs), and waits until it is ready.
func StartWebhook(ctx context.Context, c *cluster.Cluster, bin string) (*Webhook, error) {
	ca := c.CA()
	serving, err := ca.Issue([]string{"127.0.0.1", "localhost"}, 24*time.Hour)
	if err != nil {
		return nil, err
	}
	certDir := path.Join(c.Node.Dir(), "kdg", "webhook-certs")
	for _, f := range []struct {
		name string
		data []byte
	}{{"tls.key", serving.KeyPEM}, {"tls.crt", serving.CertPEM}, {"ca.crt", ca.PEM}} {
		if err := c.Node.WriteFile(ctx, path.Join(certDir, f.name), f.data, 0o600); err != nil {
			return nil, err
		}
	}
	ports, err := c.Node.FreePorts(ctx, 3)
	if err != nil {
		return nil, err
	}
	w := &Webhook{
		URL:   fmt.Sprintf("https://127.0.0.1:%d/mutate-v1-pod", ports[0]),
		CA:    ca,
		c:     c,
		probe: ports[2],
		spec: cluster.ProcSpec{Name: WebhookName, Bin: bin, Args: []string{
			"--kubeconfig=" + c.Node.Kubeconfig(),
			"--cert-dir=" + certDir,
			fmt.Sprintf("--port=%d", ports[0]),
			fmt.Sprintf("--metrics-bind-address=127.0.0.1:%d", ports[1]),
			fmt.Sprintf("--health-probe-bind-address=127.0.0.1:%d", ports[2]),
		}},
	}
	return w, w.Restart(ctx)
}

// Restart starts the webhook again, same ports and certificate, after it was
// stopped or killed, and waits until it is ready.
func (w *Webhook) Restart(ctx context.Context) error {
	if w.NodeProc != nil {
		w.NodeProc.Stop(ctx)
	}
	p, err := StartOnNode(ctx, w.c, w.spec)
	if err != nil {
		return err
	}
	w.NodeProc = p
	return p.WaitReady(ctx, w.probe)
}

// Register applies the MutatingWebhookConfiguration in manifest with its
// clientConfig pointed at w (url + the cluster CA as caBundle: there is no
// kube-proxy to reach a Service). The applied YAML is written to out.
func (w *Webhook) Register(ctx context.Context, manifest, out string) error {
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
	_, err = w.c.Kubectl(ctx, "apply", "-f", out)
	return err
}

// StartApplier runs the applier bin on the node as the DaemonSet would:
// this node, the node's containerd, the data disk's mount point as
// DATA_MOUNT, plus env (KEY=VALUE, later ones win); name names the process
// and its log. It waits until the applier is ready (its first full
// reconcile has run).
func StartApplier(ctx context.Context, c *cluster.Cluster, bin, name string, env ...string) (*NodeProc, error) {
	ports, err := c.Node.FreePorts(ctx, 2)
	if err != nil {
		return nil, err
	}
	p, err := StartOnNode(ctx, c, cluster.ProcSpec{
		Name: name, Bin: bin,
		Env: applierEnv(c, env),
		Args: []string{
			fmt.Sprintf("--metrics-bind-address=127.0.0.1:%d", ports[0]),
			fmt.Sprintf("--health-probe-bind-address=127.0.0.1:%d", ports[1]),
		},
	})
	if err != nil {
		return nil, err
	}
	if err := p.WaitReady(ctx, ports[1]); err != nil {
		p.Stop(ctx)
		return nil, err
	}
	return p, nil
}

// ResetNode runs `kubediskguard-applier reset` (bin) on the cluster's node
// with the settings StartApplier gives the applier (plus env), and returns
// what it printed.
func ResetNode(ctx context.Context, c *cluster.Cluster, bin string, env ...string) (string, error) {
	prog, err := c.Node.Program(ctx, bin)
	if err != nil {
		return "", fmt.Errorf("%s on the node: %w", bin, err)
	}
	args := append(applierEnv(c, env), prog, "reset")
	out, err := c.Node.Run(ctx, "env", args...)
	if err != nil {
		return string(out), fmt.Errorf("%s reset: %w", bin, err)
	}
	return string(out), nil
}

// applierEnv is the applier's environment on the cluster's node: its
// settings, the node's data disk mount point as DATA_MOUNT, then env.
func applierEnv(c *cluster.Cluster, env []string) []string {
	return append(append(c.Env(), "DATA_MOUNT="+c.Node.DataDir()), env...)
}

// FioRun is one fio run a pod's container logged between "=== fio run N"
// and "=== end of fio run N" (fio --output-format=json).
type FioRun struct {
	N         int
	Start     time.Time
	ReadIOPS  float64 // summed over fio's jobs
	WriteIOPS float64
}

// FioResult is what fio --output-format=json reports, as far as the tests
// read it.
type FioResult struct {
	TimestampMS int64 `json:"timestamp_ms"` // when fio finished
	Jobs        []struct {
		Error      int      `json:"error"`
		JobRuntime int64    `json:"job_runtime"` // ms
		Read       FioIOSet `json:"read"`
		Write      FioIOSet `json:"write"`
	} `json:"jobs"`
}

// FioIOSet is one direction of a fio job.
type FioIOSet struct {
	IOPS     float64 `json:"iops"`
	TotalIOs int64   `json:"total_ios"`
	Clat     struct {
		Percentile map[string]float64 `json:"percentile"` // "99.000000" → ns
	} `json:"clat_ns"`
}

// ParseFioJSON decodes fio's JSON output (notes or warnings before it are
// skipped); a result without jobs is an error.
func ParseFioJSON(b []byte) (FioResult, error) {
	var out FioResult
	if i := bytes.IndexByte(b, '{'); i >= 0 {
		b = b[i:]
	}
	if err := json.NewDecoder(bytes.NewReader(b)).Decode(&out); err != nil {
		return out, fmt.Errorf("no fio JSON: %w", err)
	}
	if len(out.Jobs) == 0 {
		return out, errors.New("no jobs in fio's result")
	}
	return out, nil
}

// errLogRead marks FioRuns' failures to read the log (not to parse it).
var errLogRead = errors.New("reading the log")

// FioRuns parses the container's log into its fio runs.
func FioRuns(ctx context.Context, client kubernetes.Interface, pod *corev1.Pod, container string) ([]FioRun, error) {
	b, err := client.CoreV1().Pods(pod.Namespace).GetLogs(pod.Name, &corev1.PodLogOptions{Container: container}).DoRaw(ctx)
	if err != nil {
		return nil, fmt.Errorf("%w of %s/%s %s: %w", errLogRead, pod.Namespace, pod.Name, container, err)
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
			out, err := ParseFioJSON(cur.Bytes())
			if err != nil {
				return nil, fmt.Errorf("fio run %d in %s/%s %s: %w: %s", n, pod.Namespace, pod.Name, container, err, strings.TrimSpace(cur.String()))
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
			if errors.Is(err, errLogRead) && !apierrors.IsNotFound(err) && !apierrors.IsForbidden(err) {
				// The apiserver's proxy to the kubelet fails now and
				// then on a loaded node ("an error on the server
				// (\"unknown\")"): asked again, it answers.
				return err
			}
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

// Tail is the last n lines of file, indented.
func Tail(file string, n int) string {
	b, _ := os.ReadFile(file)
	return tailLines(string(b), n)
}

// tailLines is the last n lines of s, indented.
func tailLines(s string, n int) string {
	lines := strings.Split(strings.TrimRight(s, "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return "    " + strings.ReplaceAll(strings.Join(lines, "\n"), "\n", "\n    ")
}
