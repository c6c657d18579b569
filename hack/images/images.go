// Package images builds KubeDiskGuard's two container images on this
// machine, from Dockerfile.webhook and Dockerfile.applier at the repository
// root, for the deployment test: Build makes them under the names and tags
// of manifests/kustomization.yaml's images: (kubediskguard/kubediskguard-
// webhook:dev and kubediskguard/kubediskguard-applier:dev), saves each with
// docker save, and Built.Import puts the saved images into a containerd
// with ctr, in the kubelet's k8s.io namespace.
//
// Build runs a private dockerd (Debian's docker.io, through
// hack/runtimetest's LaunchDockerd) whose data root is CacheDir/docker,
// kept across runs so that the stand-in bases and BuildKit's layer cache
// make the next build fast; its exec root, socket and pid file are in a
// temporary directory. dockerd is stopped, and what it left on the host
// (processes, mounts, the docker cgroups, /run/docker) undone, before Build
// returns. It builds with BuildKit (DOCKER_BUILDKIT=1), which reads the
// per-Dockerfile Dockerfile.X.dockerignore, so the context it sends holds
// only what the Dockerfile copies and not .cache (Docker 20.10's classic
// builder would send all of it); and with --network host, so that `go mod
// download` in the build stage reaches the Go module proxy.
//
// # Stand-in base images
//
// The Dockerfiles build FROM public images that a real user pulls from
// their registries: golang:1.26-bookworm for the build stage and
// gcr.io/distroless/static-debian12 (:nonroot for the webhook) for the
// final one. No registry is reachable here, so Build makes local stand-ins,
// tagged with exactly the names of the Dockerfiles' FROM lines (a base it
// has no stand-in for is an error, as is a Go version other than this
// machine's), from this machine's files, written as tar streams and loaded
// with docker import:
//
//   - golang:VERSION[-VARIANT]: the Go toolchain of `go env GOROOT` as
//     /usr/local/go, whose version must be VERSION and of go.mod's go line
//     (1.26); a static busybox (Debian's busybox-static) as /bin/sh and the
//     usual commands; CA certificates; the official image's GOPATH (/go),
//     PATH, GOTOOLCHAIN=local and working directory; and this machine's Go
//     module settings (GOPROXY, GOSUMDB, GOPRIVATE, ...) where they are not
//     Go's defaults.
//   - gcr.io/distroless/static-debian12[:nonroot]: what the real image
//     has and the binaries may use: /etc/passwd and /etc/group with root and
//     nonroot (65532), CA certificates, tzdata, /tmp, /home/nonroot, and its
//     user (0; 65532 for :nonroot), working directory, PATH and
//     SSL_CERT_FILE. No shell, no libc.
//
// A stand-in is imported again only when its content changes (a label on
// it holds its digest), so that the layer cache stays valid. The images
// built on them hold the same static binaries as images built on the real
// bases, but they are not the images a release publishes.
//
// # Running
//
// Build needs root; Debian's docker.io (dockerd, and its client
// /usr/bin/docker: a docker earlier in PATH, such as /usr/local/bin/docker
// on these machines, may be a newer client of no engine here), containerd,
// runc and busybox-static; the Go module proxy;
// and the host lock, since dockerd, containerd and cgroups are the host's:
// the caller holds realtest.HostLock (in a test) or runs under
// `flock /tmp/kubediskguard-host.lock`. A cold build takes minutes (module
// download, two compiles); a warm one, seconds. Its test:
//
//	go test -count=1 -timeout 30m -v ./hack/images/
//
// For a cluster of hack/cluster (c):
//
//	b, err := images.Build(ctx, images.Options{RepoRoot: repoRoot})
//	...
//	err = b.Import(c.Ctr) // then kubectl apply -k manifests/ runs them
package images

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/docker/docker/client"

	"github.com/kubediskguard/kubediskguard/hack/runtimetest"
)

// dockerCLI is Debian's docker.io client, of the same version as its
// dockerd.
const dockerCLI = "/usr/bin/docker"

// Options say where the images are built from and kept.
type Options struct {
	// RepoRoot is the repository: Dockerfiles, go.mod, manifests, and the
	// build context. Required.
	RepoRoot string
	// CacheDir keeps dockerd's data root (CacheDir/docker: stand-in bases,
	// layers, build cache) and the saved images (CacheDir/images) across
	// runs. Default RepoRoot/.cache, which git ignores.
	CacheDir string
	// Log gets progress lines, the build's steps included. Default
	// os.Stderr.
	Log io.Writer
}

// Image is one built image.
type Image struct {
	// Name is the binary, and the image's name after "kubediskguard/":
	// kubediskguard-webhook.
	Name string
	// Dockerfile is its file name at the repository root.
	Dockerfile string
	// Tag is its name and tag, those of manifests/kustomization.yaml:
	// kubediskguard/kubediskguard-webhook:dev.
	Tag string
	// ID is its image ID (sha256:...), the digest of its configuration.
	ID string
	// Tar is its docker save archive, in CacheDir/images.
	Tar string
	// ContextBytes is the size of the build context that BuildKit
	// received, as it reports it (4 significant digits).
	ContextBytes int64
	// BuildTime is how long docker build took.
	BuildTime time.Duration
}

// StandIn is a stand-in base image (see the package documentation).
type StandIn struct {
	// Ref is its name as a Dockerfile's FROM names it, with ":latest"
	// when that names no tag.
	Ref string
	// ID is its image ID.
	ID string
	// Made says that this Build imported it; false means that the one in
	// the cache had the same content.
	Made bool
}

// Built is what Build made.
type Built struct {
	Webhook, Applier Image
	// StandIns are the stand-in bases the builds used.
	StandIns []StandIn
}

// images returns the images, in build order.
func (b *Built) images() []*Image { return []*Image{&b.Webhook, &b.Applier} }

// Build builds both images on a private dockerd, saves them and stops the
// dockerd. The caller holds the host lock (see the package documentation).
func Build(ctx context.Context, o Options) (b Built, err error) {
	if o.RepoRoot == "" {
		return Built{}, errors.New("images: Options.RepoRoot is required")
	}
	if o.RepoRoot, err = filepath.Abs(o.RepoRoot); err != nil {
		return Built{}, fmt.Errorf("images: %w", err)
	}
	if o.CacheDir == "" {
		o.CacheDir = filepath.Join(o.RepoRoot, ".cache")
	}
	if o.CacheDir, err = filepath.Abs(o.CacheDir); err != nil {
		return Built{}, fmt.Errorf("images: %w", err)
	}
	if o.Log == nil {
		o.Log = os.Stderr
	}
	start := time.Now()
	b.Webhook = Image{Name: "kubediskguard-webhook", Dockerfile: "Dockerfile.webhook"}
	b.Applier = Image{Name: "kubediskguard-applier", Dockerfile: "Dockerfile.applier"}
	standIns, err := plan(o.RepoRoot, &b)
	if err != nil {
		return Built{}, fmt.Errorf("images: %w", err)
	}
	if _, err := os.Stat(dockerCLI); err != nil {
		return Built{}, fmt.Errorf("images: Debian's docker client: %w (get it with: %s)", err, runtimetest.DockerPackages)
	}
	saved := filepath.Join(o.CacheDir, "images")
	if err := os.MkdirAll(saved, 0o755); err != nil {
		return Built{}, fmt.Errorf("images: %w", err)
	}

	tmp, err := os.MkdirTemp("", "kdg-images-")
	if err != nil {
		return Built{}, fmt.Errorf("images: %w", err)
	}
	defer os.RemoveAll(tmp)
	d, err := runtimetest.LaunchDockerd(runtimetest.Options{Dir: tmp, DataRoot: filepath.Join(o.CacheDir, "docker"), Log: o.Log})
	if err != nil {
		return Built{}, fmt.Errorf("images: starting a private dockerd: %w", err)
	}
	defer func() {
		if stopErr := d.Stop(); stopErr != nil {
			err = errors.Join(err, fmt.Errorf("images: stopping the private dockerd: %w", stopErr))
		}
	}()
	dk := docker{host: d.Host, config: filepath.Join(tmp, "client"), api: d.Client}

	for _, s := range standIns {
		made, err := dk.ensureStandIn(ctx, s, o.Log)
		if err != nil {
			return Built{}, fmt.Errorf("images: stand-in %s: %w", s.ref, err)
		}
		b.StandIns = append(b.StandIns, made)
	}
	for _, img := range b.images() {
		// Each build with a client configuration of its own, whose node ID
		// keys what BuildKit keeps of a build context: so each sends its
		// whole context, and ContextBytes is its size, not a difference.
		bk := dk
		bk.config = filepath.Join(tmp, "client-"+img.Name)
		if err := bk.build(ctx, o.RepoRoot, img, o.Log); err != nil {
			return Built{}, fmt.Errorf("images: %w", err)
		}
		if err := dk.save(ctx, img, filepath.Join(saved, img.Name+".tar"), o.Log); err != nil {
			return Built{}, fmt.Errorf("images: %w", err)
		}
	}
	// The images that this build replaced, and replaced stand-ins: the
	// layer cache keeps what a next build reuses.
	if _, err := dk.run(ctx, "image", "prune", "--force"); err != nil {
		return Built{}, fmt.Errorf("images: %w", err)
	}
	fmt.Fprintf(o.Log, "images: built %s and %s in %s\n", b.Webhook.Tag, b.Applier.Tag, time.Since(start).Round(100*time.Millisecond))
	return b, nil
}

// Import imports the saved images into a containerd: ctr runs ctr with
// its arguments against that containerd's k8s.io namespace, the kubelet's,
// as cluster.Node.Ctr and cluster.CtrAt do. containerd names them
// docker.io/<Tag>, as the kubelet names an image without a registry.
func (b Built) Import(ctr func(args ...string) ([]byte, error)) error {
	for _, img := range b.images() {
		if _, err := ctr("images", "import", img.Tar); err != nil {
			return fmt.Errorf("images: importing %s from %s: %w", img.Tag, img.Tar, err)
		}
	}
	return nil
}

// docker runs Debian's docker client against the private dockerd.
type docker struct {
	host   string         // DOCKER_HOST
	config string         // DOCKER_CONFIG, the client's own files
	api    *client.Client // the same dockerd through the API
}

// cmd returns the command docker args, which uses BuildKit to build.
func (dk docker) cmd(ctx context.Context, args ...string) *exec.Cmd {
	cmd := exec.CommandContext(ctx, dockerCLI, args...)
	for _, kv := range os.Environ() {
		if !strings.HasPrefix(kv, "DOCKER_") {
			cmd.Env = append(cmd.Env, kv)
		}
	}
	cmd.Env = append(cmd.Env, "DOCKER_HOST="+dk.host, "DOCKER_CONFIG="+dk.config, "DOCKER_BUILDKIT=1")
	return cmd
}

// run runs docker args and returns its output, or an error with it.
func (dk docker) run(ctx context.Context, args ...string) ([]byte, error) {
	out, err := dk.cmd(ctx, args...).CombinedOutput()
	if err != nil {
		return out, fmt.Errorf("docker %s: %w: %s", strings.Join(args, " "), err, bytes.TrimSpace(out))
	}
	return out, nil
}

// proxyArgs are Docker's predefined build arguments that a build stage
// sees without an ARG: the HTTP proxies, passed on when they are set here.
var proxyArgs = []string{"HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "https_proxy", "NO_PROXY", "no_proxy", "ALL_PROXY", "all_proxy"}

// build runs docker build for img, with its steps on log, and records its
// ID, context size and build time.
func (dk docker) build(ctx context.Context, root string, img *Image, log io.Writer) error {
	fmt.Fprintf(log, "images: building %s from %s\n", img.Tag, img.Dockerfile)
	args := []string{"build", "--progress", "plain", "--network", "host", "-f", filepath.Join(root, img.Dockerfile), "-t", img.Tag}
	for _, name := range proxyArgs {
		if _, ok := os.LookupEnv(name); ok {
			args = append(args, "--build-arg", name)
		}
	}
	cmd := dk.cmd(ctx, append(args, root)...)
	p := newProgress(log, strings.TrimPrefix(img.Name, "kubediskguard-"))
	cmd.Stdout, cmd.Stderr = p, p
	start := time.Now()
	err := cmd.Run()
	p.Close()
	img.BuildTime = time.Since(start)
	if err != nil {
		return fmt.Errorf("docker build -f %s: %w; its last lines:\n%s", img.Dockerfile, err, p.Tail())
	}
	img.ContextBytes = p.ContextBytes()
	inspect, err := dk.api.ImageInspect(ctx, img.Tag)
	if err != nil {
		return fmt.Errorf("inspecting %s: %w", img.Tag, err)
	}
	img.ID = inspect.ID
	fmt.Fprintf(log, "images: built %s (%.12s) in %s; build context %s\n", img.Tag, strings.TrimPrefix(img.ID, "sha256:"), img.BuildTime.Round(100*time.Millisecond), humanBytes(img.ContextBytes))
	return nil
}

// save writes img with docker save to tarPath.
func (dk docker) save(ctx context.Context, img *Image, tarPath string, log io.Writer) error {
	start := time.Now()
	tmp := tarPath + ".tmp"
	if _, err := dk.run(ctx, "save", "-o", tmp, img.Tag); err != nil {
		os.Remove(tmp)
		return err
	}
	if err := os.Rename(tmp, tarPath); err != nil {
		return fmt.Errorf("saving %s: %w", img.Tag, err)
	}
	img.Tar = tarPath
	fi, err := os.Stat(tarPath)
	if err != nil {
		return fmt.Errorf("saving %s: %w", img.Tag, err)
	}
	fmt.Fprintf(log, "images: saved %s to %s (%s) in %s\n", img.Tag, tarPath, humanBytes(fi.Size()), time.Since(start).Round(100*time.Millisecond))
	return nil
}

// progress is the output of a docker build: it writes each line to a log
// with a prefix (leaving out BuildKit's step digests), says every
// heartbeat when a step is silent, keeps the last lines for an error and
// reads the size of the build context from BuildKit's progress.
type progress struct {
	log    io.Writer
	prefix string
	done   chan struct{}

	mu       sync.Mutex
	partial  []byte
	lastLine time.Time
	lastBeat time.Time
	tail     []string
	ctxStep  string // BuildKit's step number of "load build context"
	ctxBytes int64
}

const (
	heartbeat = 30 * time.Second
	tailLines = 40
)

var (
	stepDigestRE  = regexp.MustCompile(`^#\d+ sha256:[0-9a-f]+$`)
	loadContextRE = regexp.MustCompile(`^#(\d+) \[internal\] load build context$`)
	transferRE    = regexp.MustCompile(`^#(\d+) transferring context: ([0-9.]+)([kMGTP]?B)\b`)
)

func newProgress(log io.Writer, name string) *progress {
	now := time.Now()
	p := &progress{log: log, prefix: "  " + name + " | ", done: make(chan struct{}), lastLine: now, lastBeat: now}
	go p.beat()
	return p
}

// beat says, every heartbeat of silence, how long the build has been
// silent, until Close.
func (p *progress) beat() {
	t := time.NewTicker(heartbeat / 6)
	defer t.Stop()
	for {
		select {
		case <-p.done:
			return
		case now := <-t.C:
			p.mu.Lock()
			if now.Sub(p.lastBeat) >= heartbeat {
				fmt.Fprintf(p.log, "%s... (%s since the last line)\n", p.prefix, now.Sub(p.lastLine).Round(time.Second))
				p.lastBeat = now
			}
			p.mu.Unlock()
		}
	}
}

func (p *progress) Write(b []byte) (int, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.partial = append(p.partial, b...)
	for {
		i := bytes.IndexByte(p.partial, '\n')
		if i < 0 {
			return len(b), nil
		}
		p.line(string(bytes.TrimRight(p.partial[:i], "\r")))
		p.partial = p.partial[i+1:]
	}
}

// line handles one line of output, with p.mu held.
func (p *progress) line(l string) {
	if strings.TrimSpace(l) == "" || stepDigestRE.MatchString(l) {
		return
	}
	fmt.Fprintf(p.log, "%s%s\n", p.prefix, l)
	p.lastLine, p.lastBeat = time.Now(), time.Now()
	p.tail = append(p.tail, l)
	if len(p.tail) > tailLines {
		p.tail = p.tail[1:]
	}
	if m := loadContextRE.FindStringSubmatch(l); m != nil {
		p.ctxStep = m[1]
	}
	if m := transferRE.FindStringSubmatch(l); m != nil && m[1] == p.ctxStep {
		if n, err := parseHumanBytes(m[2], m[3]); err == nil {
			p.ctxBytes = n
		}
	}
}

// Close writes what is left of a last line and stops the heartbeat.
func (p *progress) Close() {
	close(p.done)
	p.mu.Lock()
	defer p.mu.Unlock()
	if len(p.partial) > 0 {
		p.line(string(p.partial))
		p.partial = nil
	}
}

// Tail returns the last lines of output.
func (p *progress) Tail() string {
	p.mu.Lock()
	defer p.mu.Unlock()
	return strings.Join(p.tail, "\n")
}

// ContextBytes returns the size of the build context, 0 if BuildKit did
// not report it.
func (p *progress) ContextBytes() int64 {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.ctxBytes
}

// units are the decimal units of Docker's human sizes (go-units'
// HumanSize: "62B", "1.234MB").
var units = map[string]float64{"B": 1, "kB": 1e3, "MB": 1e6, "GB": 1e9, "TB": 1e12, "PB": 1e15}

func parseHumanBytes(number, unit string) (int64, error) {
	f, err := strconv.ParseFloat(number, 64)
	if err != nil {
		return 0, fmt.Errorf("size %s%s: %w", number, unit, err)
	}
	m, ok := units[unit]
	if !ok {
		return 0, fmt.Errorf("size %s%s: unknown unit", number, unit)
	}
	return int64(f * m), nil
}

// humanBytes writes n as Docker does.
func humanBytes(n int64) string {
	f, unit := float64(n), "B"
	for _, u := range []string{"kB", "MB", "GB", "TB"} {
		if f < 1000 {
			break
		}
		f, unit = f/1000, u
	}
	return strconv.FormatFloat(f, 'g', 4, 64) + unit
}
