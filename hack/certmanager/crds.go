// Package certmanager runs a real cert-manager for the tests: its CRDs from
// the github.com/cert-manager/cert-manager module the product requires, and
// cert-manager-local (hack/tools/certmanager, built by hack/test-bins.sh), its
// certificate, issuer and CertificateRequest controllers and CA injector in
// one process. It also renews a Certificate the way `cmctl renew` does.
package certmanager

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"time"

	apiextensionsv1 "k8s.io/apiextensions-apiserver/pkg/apis/apiextensions/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/runtime"
	utilyaml "k8s.io/apimachinery/pkg/util/yaml"
	"k8s.io/client-go/rest"
	"sigs.k8s.io/controller-runtime/pkg/client"
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
// *.yaml files of dir and waits until each is Established. It returns their
// names.
func InstallCRDs(ctx context.Context, cfg *rest.Config, dir string) ([]string, error) {
	crds, err := readCRDs(dir)
	if err != nil {
		return nil, err
	}
	scheme := runtime.NewScheme()
	if err := apiextensionsv1.AddToScheme(scheme); err != nil {
		return nil, fmt.Errorf("building the CRD scheme: %w", err)
	}
	c, err := client.New(cfg, client.Options{Scheme: scheme})
	if err != nil {
		return nil, fmt.Errorf("creating a client: %w", err)
	}
	names := make([]string, 0, len(crds))
	for _, crd := range crds {
		if err := apply(ctx, c, crd); err != nil {
			return nil, err
		}
		names = append(names, crd.Name)
	}
	for _, name := range names {
		if err := waitEstablished(ctx, c, name); err != nil {
			return nil, err
		}
	}
	return names, nil
}

func readCRDs(dir string) ([]*apiextensionsv1.CustomResourceDefinition, error) {
	files, err := filepath.Glob(filepath.Join(dir, "*.yaml"))
	if err != nil {
		return nil, fmt.Errorf("listing CRD files in %s: %w", dir, err)
	}
	var crds []*apiextensionsv1.CustomResourceDefinition
	for _, file := range files {
		fromFile, err := readCRDFile(file)
		if err != nil {
			return nil, err
		}
		crds = append(crds, fromFile...)
	}
	if len(crds) == 0 {
		return nil, fmt.Errorf("no CustomResourceDefinition in %s", dir)
	}
	return crds, nil
}

func readCRDFile(file string) ([]*apiextensionsv1.CustomResourceDefinition, error) {
	f, err := os.Open(file)
	if err != nil {
		return nil, fmt.Errorf("reading CRDs: %w", err)
	}
	defer f.Close()
	var crds []*apiextensionsv1.CustomResourceDefinition
	dec := utilyaml.NewYAMLOrJSONDecoder(f, 4096)
	for {
		crd := &apiextensionsv1.CustomResourceDefinition{}
		err := dec.Decode(crd)
		if errors.Is(err, io.EOF) {
			return crds, nil
		}
		if err != nil {
			return nil, fmt.Errorf("decoding %s: %w", file, err)
		}
		switch {
		case crd.Kind == "" && crd.Name == "": // an empty document
		case crd.Kind != "CustomResourceDefinition" || crd.Name == "":
			return nil, fmt.Errorf("%s: a %q named %q, want only named CustomResourceDefinitions", file, crd.Kind, crd.Name)
		default:
			crds = append(crds, crd)
		}
	}
}

// apply creates crd, or replaces the spec of the one that exists.
func apply(ctx context.Context, c client.Client, crd *apiextensionsv1.CustomResourceDefinition) error {
	err := c.Create(ctx, crd.DeepCopy())
	if !apierrors.IsAlreadyExists(err) {
		if err != nil {
			return fmt.Errorf("creating CRD %s: %w", crd.Name, err)
		}
		return nil
	}
	existing := &apiextensionsv1.CustomResourceDefinition{}
	if err := c.Get(ctx, client.ObjectKeyFromObject(crd), existing); err != nil {
		return fmt.Errorf("reading CRD %s: %w", crd.Name, err)
	}
	existing.Spec = crd.Spec
	if err := c.Update(ctx, existing); err != nil {
		return fmt.Errorf("updating CRD %s: %w", crd.Name, err)
	}
	return nil
}

func waitEstablished(ctx context.Context, c client.Client, name string) error {
	for {
		crd := &apiextensionsv1.CustomResourceDefinition{}
		err := c.Get(ctx, client.ObjectKey{Name: name}, crd)
		if err == nil && slices.ContainsFunc(crd.Status.Conditions, func(cond apiextensionsv1.CustomResourceDefinitionCondition) bool {
			return cond.Type == apiextensionsv1.Established && cond.Status == apiextensionsv1.ConditionTrue
		}) {
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("waiting for CRD %s to be Established (last read: %v): %w", name, err, ctx.Err())
		case <-time.After(100 * time.Millisecond):
		}
	}
}
