package images

import (
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/containerd/containerd/v2/pkg/namespaces"

	"github.com/kubediskguard/kubediskguard/hack/cluster"
	"github.com/kubediskguard/kubediskguard/hack/runtimetest"
	"github.com/kubediskguard/kubediskguard/shared/realtest"
)

const repoRoot = "../.."

// want is what each Dockerfile says of its image.
var want = map[string]struct {
	tag, user, entrypoint, port string
	help                        []string // what --help prints
	id                          string   // what id prints in it
}{
	"kubediskguard-webhook": {
		tag: "kubediskguard/kubediskguard-webhook:dev", user: "65532:65532", entrypoint: "/kubediskguard-webhook", port: "9443/tcp",
		help: []string{"Usage of kubediskguard-webhook:", "-cert-dir", "-container-iops-limit", "-exclude-namespaces"},
		id:   "uid=65532(nonroot) gid=65532(nonroot)",
	},
	"kubediskguard-applier": {
		tag: "kubediskguard/kubediskguard-applier:dev", user: "0:0", entrypoint: "/kubediskguard-applier", port: "8081/tcp",
		help: []string{"Usage of kubediskguard-applier:", "-node-name", "-data-mount", "-cgroup-version"},
		id:   "uid=0(root) gid=0(root)",
	},
}

// TestBothImagesBuildFromTheirDockerfilesRunAsTheySayAndImportIntoContainerd
// builds the webhook and applier images for real, twice, on the private
// dockerd of Build, then loads the saved images into a fresh dockerd and
// runs them, and imports them into a private containerd.
func TestBothImagesBuildFromTheirDockerfilesRunAsTheySayAndImportIntoContainerd(t *testing.T) {
	if testing.Short() {
		t.Skip("builds both images on a private dockerd (minutes when cold); not with -short")
	}
	realtest.Root(t)
	runtimetest.Bin(t, "dockerd", runtimetest.DockerPackages)
	for _, bin := range []string{"containerd", "containerd-shim-runc-v2", "runc"} {
		runtimetest.Bin(t, bin, runtimetest.ContainerdPackages)
	}
	ctrBin := runtimetest.Bin(t, "ctr", runtimetest.ContainerdPackages)
	if _, err := os.Stat(dockerCLI); err != nil {
		realtest.Missing(t, dockerCLI+", Debian's docker client", runtimetest.DockerPackages)
	}
	busybox, err := runtimetest.Busybox()
	if err != nil {
		realtest.Missing(t, "a statically linked busybox", runtimetest.BusyboxPackages)
	}
	realtest.HostLock(t)
	ctx := t.Context()
	root, err := filepath.Abs(repoRoot)
	if err != nil {
		t.Fatal(err)
	}
	dataRoot := filepath.Join(root, ".cache", "docker")
	host := snapshotHost(t, dataRoot)
	cache := "warm: .cache/docker was there"
	if _, err := os.Stat(dataRoot); err != nil {
		cache = "cold: no .cache/docker"
	}

	build := func() (Built, time.Duration) {
		t.Helper()
		start := time.Now()
		b, err := Build(ctx, Options{RepoRoot: root, Log: testLog{t}})
		took := time.Since(start)
		if err != nil {
			t.Fatal(err)
		}
		host.check(t)
		return b, took
	}
	first, firstTook := build()
	second, secondTook := build()
	t.Logf("first Build %s (%s), second Build %s", firstTook.Round(100*time.Millisecond), cache, secondTook.Round(100*time.Millisecond))
	for _, img := range first.images() {
		t.Logf("%s: docker build %s, then %s; context %s", img.Tag, img.BuildTime.Round(100*time.Millisecond), second.imageNamed(t, img.Name).BuildTime.Round(100*time.Millisecond), humanBytes(img.ContextBytes))
	}

	t.Run("the images have the tags of the manifests", func(t *testing.T) {
		for _, img := range first.images() {
			if img.Tag != want[img.Name].tag {
				t.Errorf("%s is tagged %s, want %s (manifests/kustomization.yaml)", img.Name, img.Tag, want[img.Name].tag)
			}
		}
	})

	t.Run("a second build with nothing changed reuses the stand-ins and the layer cache", func(t *testing.T) {
		for _, s := range second.StandIns {
			if s.Made {
				t.Errorf("stand-in %s was imported again", s.Ref)
			}
		}
		for _, img := range first.images() {
			if again := second.imageNamed(t, img.Name); again.ID != img.ID {
				t.Errorf("%s: image %s after the first build, %s after the second: a layer was built again", img.Tag, img.ID, again.ID)
			}
		}
		if len(second.StandIns) != 3 {
			t.Errorf("stand-ins %+v, want golang:1.26-bookworm and distroless static :nonroot and :latest", second.StandIns)
		}
	})

	t.Run("the build context is what the Dockerfile copies and not .cache", func(t *testing.T) {
		for _, img := range first.images() {
			copied := contextSize(t, root, img.Name)
			t.Logf("%s: BuildKit received %s; go.mod, go.sum, shared/ and %s/ without tests hold %s", img.Tag, humanBytes(img.ContextBytes), img.Name, humanBytes(copied))
			if img.ContextBytes < copied*9/10 || img.ContextBytes > copied*11/10+100_000 {
				t.Errorf("%s: context %d bytes, want about %d (what the Dockerfile copies)", img.Tag, img.ContextBytes, copied)
			}
		}
	})

	// A fresh dockerd, with nothing but what the saved images hold.
	dir, err := os.MkdirTemp("", "kdg-images-test-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	d, err := runtimetest.LaunchDockerd(runtimetest.Options{Dir: dir, Log: testLog{t}})
	t.Cleanup(func() {
		if d == nil {
			return
		}
		if err := d.Stop(); err != nil {
			t.Error(err)
		}
		host.check(t)
	})
	if err != nil {
		t.Fatal(err)
	}
	dk := docker{host: d.Host, config: filepath.Join(dir, "client"), api: d.Client}
	for _, img := range first.images() {
		if _, err := dk.run(ctx, "load", "-i", img.Tar); err != nil {
			t.Fatal(err)
		}
	}

	t.Run("the saved images have the configuration their Dockerfiles give", func(t *testing.T) {
		for _, img := range first.images() {
			w := want[img.Name]
			got, err := dk.api.ImageInspect(ctx, img.Tag)
			if err != nil {
				t.Fatal(err)
			}
			if got.ID != img.ID {
				t.Errorf("%s: loaded image %s, built %s", img.Tag, got.ID, img.ID)
			}
			if got.Config.User != w.user {
				t.Errorf("%s: User %q, want %q", img.Tag, got.Config.User, w.user)
			}
			if !slices.Equal(got.Config.Entrypoint, []string{w.entrypoint}) {
				t.Errorf("%s: Entrypoint %q, want [%s]", img.Tag, got.Config.Entrypoint, w.entrypoint)
			}
			if _, ok := got.Config.ExposedPorts[w.port]; !ok {
				t.Errorf("%s: ExposedPorts %v lack %s", img.Tag, got.Config.ExposedPorts, w.port)
			}
			// The distroless stand-in's environment, quoted in its
			// docker import --change.
			if env := "SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt"; !slices.Contains(got.Config.Env, env) {
				t.Errorf("%s: Env %q lacks %s", img.Tag, got.Config.Env, env)
			}
		}
	})

	t.Run("each binary runs alone in its image and prints its settings", func(t *testing.T) {
		// The distroless stand-ins have no libc and no loader: a binary
		// that runs there is static.
		for _, img := range first.images() {
			out, err := dk.run(ctx, "run", "--rm", "--network", "none", img.Tag, "--help")
			if err != nil {
				t.Errorf("%s --help: %v", img.Tag, err)
				continue
			}
			for _, s := range want[img.Name].help {
				if !strings.Contains(string(out), s) {
					t.Errorf("%s --help printed no %q:\n%s", img.Tag, s, out)
				}
			}
		}
	})

	t.Run("the webhook runs as nonroot 65532 and the applier as root", func(t *testing.T) {
		for _, img := range first.images() {
			out, err := dk.run(ctx, "run", "--rm", "--network", "none", "-v", busybox+":/busybox:ro", "--entrypoint", "/busybox", img.Tag, "id")
			if err != nil {
				t.Errorf("%s: %v", img.Tag, err)
				continue
			}
			if !strings.HasPrefix(string(out), want[img.Name].id) {
				t.Errorf("%s: id printed %q, want %s...", img.Tag, strings.TrimSpace(string(out)), want[img.Name].id)
			}
		}
	})

	t.Run("the saved images import into containerd under the names the kubelet uses", func(t *testing.T) {
		cdir, err := os.MkdirTemp("", "kdg-images-test-")
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { os.RemoveAll(cdir) })
		c, err := runtimetest.LaunchContainerd(runtimetest.Options{Dir: cdir, Log: testLog{t}})
		if c != nil {
			t.Cleanup(func() {
				if err := c.Stop(); err != nil {
					t.Error(err)
				}
			})
		}
		if err != nil {
			t.Fatal(err)
		}
		if err := first.Import(cluster.CtrAt(ctrBin, c.Socket)); err != nil {
			t.Fatal(err)
		}
		ctx := namespaces.WithNamespace(ctx, "k8s.io")
		for _, img := range first.images() {
			ci, err := c.Client.GetImage(ctx, "docker.io/"+img.Tag)
			if err != nil {
				t.Errorf("%s: %v", img.Tag, err)
				continue
			}
			config, err := ci.Config(ctx)
			if err != nil {
				t.Fatal(err)
			}
			if config.Digest.String() != img.ID {
				t.Errorf("%s: containerd has configuration %s, docker built %s", img.Tag, config.Digest, img.ID)
			}
			spec, err := ci.Spec(ctx)
			if err != nil {
				t.Fatal(err)
			}
			if spec.Config.User != want[img.Name].user || !slices.Equal(spec.Config.Entrypoint, []string{want[img.Name].entrypoint}) {
				t.Errorf("%s in containerd: User %q, Entrypoint %q", img.Tag, spec.Config.User, spec.Config.Entrypoint)
			}
			if ok, err := ci.IsUnpacked(ctx, "overlayfs"); err != nil || !ok {
				t.Errorf("%s is not unpacked for the overlayfs snapshotter: %v", img.Tag, err)
			}
		}
	})
}

// imageNamed returns the image of the binary name.
func (b *Built) imageNamed(t *testing.T, name string) *Image {
	t.Helper()
	for _, img := range b.images() {
		if img.Name == name {
			return img
		}
	}
	t.Fatalf("no image %s", name)
	return nil
}

// contextSize returns the size of what the Dockerfile of the binary name
// copies: go.mod, go.sum, shared/ and <name>/, without tests and testdata,
// as its .dockerignore says.
func contextSize(t *testing.T, root, name string) int64 {
	t.Helper()
	var n int64
	for _, p := range []string{"go.mod", "go.sum", "shared", strings.TrimPrefix(name, "kubediskguard-")} {
		err := filepath.WalkDir(filepath.Join(root, p), func(p string, e fs.DirEntry, err error) error {
			if err != nil {
				return err
			}
			if e.IsDir() && e.Name() == "testdata" {
				return filepath.SkipDir
			}
			if e.Type().IsRegular() && !strings.HasSuffix(e.Name(), "_test.go") {
				fi, err := e.Info()
				if err != nil {
					return err
				}
				n += fi.Size()
			}
			return nil
		})
		if err != nil {
			t.Fatal(err)
		}
	}
	return n
}

// hostState is what a dockerd may leave on the host: processes naming its
// data root, mounts under it, the docker cgroups, /run/docker.
type hostState struct {
	dataRoot string
	before   map[string]bool
}

// hostPaths are the paths that a dockerd makes outside its directories.
func hostPaths(t *testing.T) []string {
	t.Helper()
	paths, err := filepath.Glob("/sys/fs/cgroup/*/docker")
	if err != nil {
		t.Fatal(err)
	}
	return append(paths, "/run/docker", "/etc/docker/key.json")
}

func snapshotHost(t *testing.T, dataRoot string) *hostState {
	t.Helper()
	h := &hostState{dataRoot: dataRoot, before: map[string]bool{}}
	for _, p := range hostPaths(t) {
		if _, err := os.Stat(p); err == nil {
			h.before[p] = true
		}
	}
	return h
}

// check fails the test if the host has what a stopped dockerd left.
func (h *hostState) check(t *testing.T) {
	t.Helper()
	for _, p := range hostPaths(t) {
		if _, err := os.Stat(p); err == nil && !h.before[p] {
			t.Errorf("%s is left on the host", p)
		}
	}
	mounts, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		t.Fatal(err)
	}
	for l := range strings.Lines(string(mounts)) {
		if strings.Contains(l, " "+h.dataRoot+"/") || strings.Contains(l, "/kdg-images-") {
			t.Errorf("a mount is left: %s", strings.TrimSpace(l))
		}
	}
	procs, err := filepath.Glob("/proc/[0-9]*/cmdline")
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range procs {
		b, _ := os.ReadFile(p)
		if strings.Contains(string(b), h.dataRoot) || strings.Contains(string(b), "/kdg-images-") {
			t.Errorf("a process is left: %s", strings.ReplaceAll(string(b), "\x00", " "))
		}
	}
}

// testLog writes each line to the test's log.
type testLog struct{ t *testing.T }

func (l testLog) Write(b []byte) (int, error) {
	l.t.Log(strings.TrimRight(string(b), "\n"))
	return len(b), nil
}

// The unit tests below need no real component.

func TestTheDockerfilesStartFromTheBasesThatHaveStandIns(t *testing.T) {
	for file, bases := range map[string][]string{
		"Dockerfile.webhook": {"golang:1.26-bookworm", "gcr.io/distroless/static-debian12:nonroot"},
		"Dockerfile.applier": {"golang:1.26-bookworm", "gcr.io/distroless/static-debian12"},
	} {
		b, err := os.ReadFile(filepath.Join(repoRoot, file))
		if err != nil {
			t.Fatal(err)
		}
		got, err := dockerfileBases(b)
		if err != nil {
			t.Fatal(err)
		}
		if !slices.Equal(got, bases) {
			t.Errorf("%s starts from %q, want %q (a new base needs a stand-in in standin.go)", file, got, bases)
		}
	}
}

func TestAFromThatNamesAnEarlierStageIsNotABase(t *testing.T) {
	got, err := dockerfileBases([]byte("# FROM nothing\nFROM --platform=linux/amd64 golang:1.26 AS Build\nRUN true\nfrom build as test\nFROM scratch\nCOPY --from=build /a /a\n"))
	if err != nil {
		t.Fatal(err)
	}
	if want := []string{"golang:1.26", "scratch"}; !slices.Equal(got, want) {
		t.Errorf("bases %q, want %q", got, want)
	}
	if _, err := dockerfileBases([]byte("ARG GO=1.26\nFROM golang:${GO}\n")); err == nil || !strings.Contains(err.Error(), "build argument") {
		t.Errorf("a base named by a build argument: error %v", err)
	}
}

func TestABaseWithoutAStandInIsRefusedByName(t *testing.T) {
	host := goEnv{root: "/usr/local/go", version: "go1.26.8"}
	for ref, says := range map[string]string{
		"alpine:3.20": "no stand-in for base image alpine:3.20",
		"gcr.io/distroless/static-debian12:debug":  "no stand-in for base image gcr.io/distroless/static-debian12:debug",
		"gcr.io/distroless/base-debian12":          "no stand-in for base image gcr.io/distroless/base-debian12",
		"golang:1.27-bookworm":                     "wants Go 1.27, but this machine's Go (GOROOT /usr/local/go) is go1.26.8",
		"golang:1.26.3":                            "wants Go 1.26.3",
		"golang@sha256:" + strings.Repeat("0", 64): "pinned by digest",
	} {
		if _, err := newStandIn(ref, host); err == nil || !strings.Contains(err.Error(), says) {
			t.Errorf("newStandIn(%s): error %v, want one saying %q", ref, err, says)
		}
	}
}

func TestTheGoVersionOfAGolangTagMatchesItsPatchReleases(t *testing.T) {
	for tag, is := range map[string]bool{"1.26": true, "1": true, "1.26.8": true, "1.26.3": false, "1.2": false, "1.27": false} {
		if got := goVersionIs("go1.26.8", tag); got != is {
			t.Errorf("goVersionIs(go1.26.8, %s) = %v", tag, got)
		}
	}
	if goFamily("go1.26.8") != "1.26" || goFamily("1.26.0") != "1.26" {
		t.Errorf("goFamily: %s, %s", goFamily("go1.26.8"), goFamily("1.26.0"))
	}
}

func TestTheManifestsNameBothImagesWithATag(t *testing.T) {
	tags, err := manifestTags(filepath.Join(repoRoot, "manifests", "kustomization.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	for name, w := range want {
		if got := tags["kubediskguard/"+name]; got != w.tag {
			t.Errorf("kubediskguard/%s becomes %q, want %q", name, got, w.tag)
		}
	}
}

func TestTheContextSizeComesFromBuildKitsLoadBuildContextStep(t *testing.T) {
	var log strings.Builder
	p := newProgress(&log, "webhook")
	for _, l := range []string{
		"#1 [internal] load build definition from Dockerfile.webhook",
		"#1 sha256:0859eae7298f9d63a316e9c66bab56cb038bd8d7885ae6f36b0b2db2da121d80",
		"#1 transferring dockerfile: 1.44kB done",
		"#2 [internal] load .dockerignore",
		"#2 transferring context: 2B done",
		"#5 [internal] load build context",
		"#5 transferring context: 301.2kB 0.5s",
		"#5 transferring context: 1.234MB 0.9s done",
		"#5 DONE 1.0s",
	} {
		p.Write([]byte(l + "\n"))
	}
	p.Write([]byte("no newline at the end"))
	p.Close()
	if got := p.ContextBytes(); got != 1_234_000 {
		t.Errorf("ContextBytes() = %d, want 1234000", got)
	}
	if strings.Contains(log.String(), "sha256:0859") || !strings.Contains(log.String(), "  webhook | #5 DONE 1.0s\n") || !strings.HasSuffix(log.String(), "  webhook | no newline at the end\n") {
		t.Errorf("log:\n%s", log.String())
	}
	if got := humanBytes(1_234_000); got != "1.234MB" {
		t.Errorf("humanBytes(1234000) = %s", got)
	}
}
