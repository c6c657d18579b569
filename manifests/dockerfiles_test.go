package manifests

import (
	"fmt"
	"os"
	"regexp"
	"slices"
	"strings"
	"testing"
)

// The Dockerfiles build the images the base deploys. Their base image names
// are fixed: the test tooling makes local stand-ins with exactly these names
// (no registry is reachable there), and users pull them.
func TestTheDockerfilesBuildLikeTheMakefile(t *testing.T) {
	gomod, err := os.ReadFile("../go.mod")
	if err != nil {
		t.Fatal(err)
	}
	m := regexp.MustCompile(`(?m)^go (\d+\.\d+)`).FindSubmatch(gomod)
	if m == nil {
		t.Fatal("go.mod has no go line")
	}
	goMinor := string(m[1]) // the builder image's Go is go.mod's, e.g. 1.26
	for _, tc := range []struct {
		file, pkg, binary string
		from              []string
		user              string
	}{
		// The webhook's USER is the uid its Deployment runs as, numeric so
		// that the kubelet can check runAsNonRoot.
		{"../Dockerfile.webhook", "./webhook", "kubediskguard-webhook",
			[]string{"golang:" + goMinor + "-bookworm AS build", "gcr.io/distroless/static-debian12:nonroot"}, fmt.Sprintf("%d:%d", nonrootUID, nonrootUID)},
		{"../Dockerfile.applier", "./applier", "kubediskguard-applier",
			[]string{"golang:" + goMinor + "-bookworm AS build", "gcr.io/distroless/static-debian12"}, "0:0"},
	} {
		t.Run(tc.file, func(t *testing.T) {
			b, err := os.ReadFile(tc.file)
			if err != nil {
				t.Fatal(err)
			}
			var from []string
			var user, entrypoint, build string
			for _, line := range strings.Split(string(b), "\n") {
				word, rest, _ := strings.Cut(strings.TrimSpace(line), " ")
				switch strings.ToUpper(word) {
				case "FROM":
					from = append(from, strings.TrimSpace(rest))
				case "USER":
					user = strings.TrimSpace(rest)
				case "ENTRYPOINT":
					entrypoint = strings.TrimSpace(rest)
				case "RUN":
					if strings.Contains(rest, "go build") {
						build = rest
					}
				}
			}
			if !slices.Equal(from, tc.from) {
				t.Errorf("FROM %q, want %q", from, tc.from)
			}
			if user != tc.user {
				t.Errorf("final USER %q, want %q", user, tc.user)
			}
			if want := `["/` + tc.binary + `"]`; entrypoint != want {
				t.Errorf("ENTRYPOINT %s, want %s", entrypoint, want)
			}
			for _, want := range []string{"-trimpath", `-ldflags "-s -w"`, " " + tc.pkg} {
				if !strings.Contains(build, want) {
					t.Errorf("go build %q lacks %q (the Makefile's build target)", build, want)
				}
			}
			if !regexp.MustCompile(`(?m)^ENV .*CGO_ENABLED=0`).Match(b) && !strings.Contains(build, "CGO_ENABLED=0") {
				t.Error("the build does not set CGO_ENABLED=0: the distroless static image has no libc")
			}
		})
	}
}
