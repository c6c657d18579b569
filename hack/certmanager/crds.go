// Package certmanager runs a real cert-manager for the tests: its CRDs from
// the github.com/cert-manager/cert-manager module the product requires, and
// cert-manager-local (hack/tools/certmanager, built by hack/test-bins.sh), its
// certificate, issuer and CertificateRequest controllers and CA injector in
// one process. It also renews a Certificate the way `cmctl renew` does.
package certmanager

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"k8s.io/client-go/rest"
	"sigs.k8s.io/controller-runtime/pkg/envtest"
)

// Module is the Go module whose CRDs are installed and whose controllers
// cert-manager-local runs, at the version the product's go.mod requires
// (hack/tools/certmanager pins the same).
const Module = "github.com/cert-manager/cert-manager"

// CRDDir returns deploy/crds of Module in the module cache, downloading the
// module if needed. It runs `go mod download -json`, so the working
// directory must be inside the product module (as a test's is).
//
// Those files are plain CustomResourceDefinitions written by controller-gen
// (no Helm templating); their specs equal the Helm chart's CRD templates,
// which only add Helm labels and annotations.
func CRDDir() (string, error) {
	cmd := exec.Command("go", "mod", "download", "-json", Module)
	var stderr strings.Builder
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		return "", fmt.Errorf("go mod download %s: %w: %s", Module, err, strings.TrimSpace(stderr.String()))
	}
	var mod struct{ Version, Dir, Error string }
	if err := json.Unmarshal(out, &mod); err != nil {
		return "", fmt.Errorf("go mod download %s: reading its output: %w", Module, err)
	}
	if mod.Error != "" || mod.Dir == "" {
		return "", fmt.Errorf("go mod download %s: no module directory: %s", Module, mod.Error)
	}
	dir := filepath.Join(mod.Dir, "deploy", "crds")
	if _, err := os.Stat(dir); err != nil {
		return "", fmt.Errorf("%s %s ships no deploy/crds: %w", Module, mod.Version, err)
	}
	return dir, nil
}

// InstallCRDs creates (or updates) every CustomResourceDefinition in the
// YAML (and JSON) files of dir and waits until the API server serves each,
// with envtest's installer. It returns their names, sorted.
func InstallCRDs(ctx context.Context, cfg *rest.Config, dir string) ([]string, error) {
	opts := envtest.CRDInstallOptions{Paths: []string{dir}, ErrorIfPathMissing: true}
	if deadline, ok := ctx.Deadline(); ok {
		opts.MaxTime = time.Until(deadline)
	}
	crds, err := envtest.InstallCRDs(cfg, opts)
	if err != nil {
		return nil, fmt.Errorf("installing the CRDs of %s: %w", dir, err)
	}
	if len(crds) == 0 {
		return nil, fmt.Errorf("no CustomResourceDefinition in %s", dir)
	}
	names := make([]string, 0, len(crds))
	for _, crd := range crds {
		names = append(names, crd.Name)
	}
	slices.Sort(names)
	return names, nil
}
