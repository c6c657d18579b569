package images

import (
	"bufio"
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"maps"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"

	"sigs.k8s.io/yaml"
)

// plan reads the repository: it sets the images' tags from the manifests
// and returns a stand-in for each base image that the Dockerfiles' FROM
// lines name, each once.
func plan(root string, b *Built) ([]standIn, error) {
	tags, err := manifestTags(filepath.Join(root, "manifests", "kustomization.yaml"))
	if err != nil {
		return nil, err
	}
	for _, img := range b.images() {
		tag, ok := tags["kubediskguard/"+img.Name]
		if !ok {
			return nil, fmt.Errorf("manifests/kustomization.yaml: no images: entry named kubediskguard/%s", img.Name)
		}
		img.Tag = tag
	}

	host, err := hostGo(root)
	if err != nil {
		return nil, err
	}
	var out []standIn
	seen := map[string]bool{}
	for _, img := range b.images() {
		df, err := os.ReadFile(filepath.Join(root, img.Dockerfile))
		if err != nil {
			return nil, err
		}
		refs, err := dockerfileBases(df)
		if err != nil {
			return nil, fmt.Errorf("%s: %w", img.Dockerfile, err)
		}
		for _, ref := range refs {
			s, err := newStandIn(ref, host)
			if err != nil {
				return nil, fmt.Errorf("%s: %w", img.Dockerfile, err)
			}
			if !seen[s.ref] {
				seen[s.ref] = true
				out = append(out, s)
			}
		}
	}
	return out, nil
}

// manifestTags returns, for each entry of a kustomization's images:, the
// image its name becomes: newName (default name), ":", newTag.
func manifestTags(path string) (map[string]string, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	var k struct {
		Images []struct {
			Name    string `json:"name"`
			NewName string `json:"newName"`
			NewTag  string `json:"newTag"`
			Digest  string `json:"digest"`
		} `json:"images"`
	}
	if err := yaml.Unmarshal(b, &k); err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	tags := map[string]string{}
	for _, img := range k.Images {
		if img.NewTag == "" || img.Digest != "" {
			return nil, fmt.Errorf("%s: image %s: a local build needs a newTag and no digest", path, img.Name)
		}
		name := img.Name
		if img.NewName != "" {
			name = img.NewName
		}
		tags[img.Name] = name + ":" + img.NewTag
	}
	return tags, nil
}

// dockerfileBases returns the images that the stages of a Dockerfile start
// FROM, in order, leaving out the earlier stages that a FROM names.
func dockerfileBases(dockerfile []byte) ([]string, error) {
	var bases []string
	stages := map[string]bool{}
	s := bufio.NewScanner(bytes.NewReader(dockerfile))
	for s.Scan() {
		f := strings.Fields(s.Text())
		if len(f) == 0 || !strings.EqualFold(f[0], "FROM") {
			continue
		}
		args := slices.DeleteFunc(f[1:], func(a string) bool { return strings.HasPrefix(a, "--") })
		if len(args) == 0 {
			return nil, fmt.Errorf("%q names no image", s.Text())
		}
		stage := ""
		if len(args) == 3 && strings.EqualFold(args[1], "AS") {
			stage = strings.ToLower(args[2])
		} else if len(args) != 1 {
			return nil, fmt.Errorf("%q: want FROM IMAGE [AS NAME]", s.Text())
		}
		ref := args[0]
		if strings.Contains(ref, "$") {
			return nil, fmt.Errorf("%q: a base named by a build argument has no stand-in", s.Text())
		}
		if !stages[strings.ToLower(ref)] {
			bases = append(bases, ref)
		}
		if stage != "" {
			stages[stage] = true
		}
	}
	return bases, s.Err()
}

// goEnv is this machine's Go, the one that builds the repository.
type goEnv struct {
	root    string // GOROOT, symbolic links resolved
	version string // go1.26.8
	// module are the settings of fetching modules (GOPROXY, ...) that are
	// not Go's defaults here.
	module map[string]string
}

// moduleSettings are the Go settings that `go mod download` fetches with.
// (GOFLAGS is not one: the Dockerfiles set it.)
var moduleSettings = []string{"GOPROXY", "GOSUMDB", "GONOSUMDB", "GONOPROXY", "GOPRIVATE", "GOINSECURE"}

// hostGo returns the Go toolchain that builds the module at root, after
// checking that it is of go.mod's go line's version (1.26.x for 1.26.0).
func hostGo(root string) (goEnv, error) {
	gobin, err := exec.LookPath("go")
	if err != nil {
		return goEnv{}, fmt.Errorf("the Go toolchain for the builder stand-in: %w", err)
	}
	goenv := func(args ...string) (map[string]string, error) {
		cmd := exec.Command(gobin, append([]string{"env", "-json"}, args...)...)
		cmd.Dir = root
		out, err := cmd.Output()
		if err != nil {
			var ee *exec.ExitError
			if errors.As(err, &ee) {
				err = fmt.Errorf("%w: %s", err, bytes.TrimSpace(ee.Stderr))
			}
			return nil, fmt.Errorf("go env %s: %w", strings.Join(args, " "), err)
		}
		env := map[string]string{}
		if err := json.Unmarshal(out, &env); err != nil {
			return nil, fmt.Errorf("go env %s: %w", strings.Join(args, " "), err)
		}
		return env, nil
	}
	env, err := goenv("GOROOT", "GOVERSION")
	if err != nil {
		return goEnv{}, err
	}
	changed, err := goenv("-changed")
	if err != nil {
		return goEnv{}, err
	}
	g := goEnv{version: strings.Fields(env["GOVERSION"] + " ")[0], module: map[string]string{}}
	if g.root, err = filepath.EvalSymlinks(env["GOROOT"]); err != nil {
		return goEnv{}, fmt.Errorf("GOROOT: %w", err)
	}
	for _, k := range moduleSettings {
		if v, ok := changed[k]; ok {
			g.module[k] = v
		}
	}

	gomod, err := os.ReadFile(filepath.Join(root, "go.mod"))
	if err != nil {
		return goEnv{}, err
	}
	var goLine string
	for l := range strings.Lines(string(gomod)) {
		if f := strings.Fields(l); len(f) == 2 && f[0] == "go" {
			goLine = f[1]
		}
	}
	if goLine == "" {
		return goEnv{}, errors.New("go.mod has no go line")
	}
	if goFamily(goLine) != goFamily(g.version) {
		return goEnv{}, fmt.Errorf("go.mod's go line is %s, but this machine's Go (GOROOT %s) is %s: the builder stand-in must be Go %s", goLine, g.root, g.version, goFamily(goLine))
	}
	return g, nil
}

// goFamily returns the language version of a Go version: 1.26 of go1.26.8
// and of 1.26.0.
func goFamily(v string) string {
	parts := strings.SplitN(strings.TrimPrefix(v, "go"), ".", 3)
	if len(parts) < 2 {
		return parts[0]
	}
	return parts[0] + "." + parts[1]
}

// goVersionIs reports whether the Go version (go1.26.8) is the one an image
// tag's version names (1.26.8, 1.26 or 1).
func goVersionIs(version, tagVersion string) bool {
	have := strings.Split(strings.TrimPrefix(version, "go"), ".")
	want := strings.Split(tagVersion, ".")
	return len(want) <= len(have) && slices.Equal(have[:len(want)], want)
}

// sortedKeys returns m's keys in order.
func sortedKeys(m map[string]string) []string { return slices.Sorted(maps.Keys(m)) }
