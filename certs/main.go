// Command certs makes the webhook's TLS material where cert-manager is absent
// (clusters without it, local runs): a CA and a serving certificate for the
// webhook's Service, written as tls.crt, tls.key and ca.crt into --out. It
// prints the CA as the base64 caBundle of the webhook configuration, or, with
// --patch-manifest, writes a copy of that configuration with caBundle set.
//
//	go run ./certs --out .cache/certs --patch-manifest manifests/webhook/mutatingwebhookconfiguration.yaml
//	kubectl -n kubediskguard-system create secret tls kubediskguard-webhook-tls \
//	    --cert .cache/certs/tls.crt --key .cache/certs/tls.key
//	kubectl apply -f .cache/certs/mutatingwebhookconfiguration.yaml
package main

import (
	"encoding/base64"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"time"

	admissionregistrationv1 "k8s.io/api/admissionregistration/v1"
	"sigs.k8s.io/yaml"

	"github.com/kubediskguard/kubediskguard/certs/pki"
)

// injectAnnotation is cert-manager's CA injection request; a patched
// configuration drops it, since its caBundle no longer comes from
// cert-manager.
const injectAnnotation = "cert-manager.io/inject-ca-from"

// PatchedName is the file --patch-manifest writes into --out.
const PatchedName = "mutatingwebhookconfiguration.yaml"

func main() {
	if err := run(os.Args[1:], os.Stdout, os.Stderr); err != nil {
		if !errors.Is(err, flag.ErrHelp) {
			fmt.Fprintln(os.Stderr, "certs:", err)
		}
		os.Exit(2)
	}
}

type options struct {
	namespace, service, out, patch string
	hosts                          []string
	validFor                       time.Duration
}

func parse(args []string, stderr io.Writer) (*options, error) {
	o := &options{}
	fs := flag.NewFlagSet("certs", flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.StringVar(&o.namespace, "namespace", "kubediskguard-system", "namespace of the webhook's Service")
	fs.StringVar(&o.service, "service", "kubediskguard-webhook", "name of the webhook's Service")
	fs.StringVar(&o.out, "out", filepath.Join(".cache", "certs"), "directory to write tls.crt, tls.key and ca.crt into")
	var hosts string
	fs.StringVar(&hosts, "hosts", "", "extra comma-separated DNS names and IP addresses for the serving certificate (e.g. localhost,127.0.0.1)")
	fs.StringVar(&o.patch, "patch-manifest", "", "a MutatingWebhookConfiguration file: write a copy with caBundle set to --out/"+PatchedName+" instead of printing the caBundle")
	fs.DurationVar(&o.validFor, "valid-for", 365*24*time.Hour, "validity of the CA and the serving certificate")
	if err := fs.Parse(args); err != nil {
		return nil, err
	}
	if fs.NArg() > 0 {
		return nil, fmt.Errorf("unexpected arguments %q", fs.Args())
	}
	var errs []error
	if strings.TrimSpace(o.namespace) == "" {
		errs = append(errs, errors.New("--namespace must not be empty"))
	}
	if strings.TrimSpace(o.service) == "" {
		errs = append(errs, errors.New("--service must not be empty"))
	}
	if strings.TrimSpace(o.out) == "" {
		errs = append(errs, errors.New("--out must not be empty"))
	}
	if o.validFor <= 0 {
		errs = append(errs, fmt.Errorf("invalid value %s for --valid-for: want a positive duration", o.validFor))
	}
	o.hosts = ServiceHosts(o.service, o.namespace)
	for _, h := range strings.Split(hosts, ",") {
		if h = strings.TrimSpace(h); h != "" {
			o.hosts = append(o.hosts, h)
		}
	}
	return o, errors.Join(errs...)
}

// ServiceHosts are the DNS names the apiserver may use for a Service.
func ServiceHosts(service, namespace string) []string {
	return []string{
		service + "." + namespace + ".svc",
		service + "." + namespace + ".svc.cluster.local",
	}
}

func run(args []string, stdout, stderr io.Writer) error {
	o, err := parse(args, stderr)
	if err != nil {
		return err
	}
	_, ca, err := pki.WriteNew(o.out, o.hosts, o.validFor)
	if err != nil {
		return err
	}
	bundle := base64.StdEncoding.EncodeToString(ca.PEM)
	fmt.Fprintf(stderr, "wrote a CA and a serving certificate for %s into %s\n", strings.Join(o.hosts, ", "), o.out)
	if o.patch == "" {
		fmt.Fprintln(stdout, bundle)
		return nil
	}
	dst := filepath.Join(o.out, PatchedName)
	if err := patchManifest(o.patch, dst, ca.PEM); err != nil {
		return err
	}
	fmt.Fprintf(stderr, "wrote %s with caBundle set\n", dst)
	fmt.Fprintf(stderr, "next: kubectl -n %s create secret tls %s-tls --cert %s --key %s\n      kubectl apply -f %s\n",
		o.namespace, o.service, filepath.Join(o.out, "tls.crt"), filepath.Join(o.out, "tls.key"), dst)
	return nil
}

// patchManifest reads the MutatingWebhookConfiguration in src (unknown fields
// are errors), sets caBundle on every webhook that calls a Service, drops
// cert-manager's injection annotation and writes the result to dst.
func patchManifest(src, dst string, caPEM []byte) error {
	b, err := os.ReadFile(src)
	if err != nil {
		return err
	}
	var cfg admissionregistrationv1.MutatingWebhookConfiguration
	if err := yaml.UnmarshalStrict(b, &cfg); err != nil {
		return fmt.Errorf("%s: %w", src, err)
	}
	if cfg.Kind != "MutatingWebhookConfiguration" {
		return fmt.Errorf("%s: kind %q, want MutatingWebhookConfiguration", src, cfg.Kind)
	}
	if len(cfg.Webhooks) == 0 {
		return fmt.Errorf("%s: no webhooks", src)
	}
	for i := range cfg.Webhooks {
		cfg.Webhooks[i].ClientConfig.CABundle = caPEM
	}
	delete(cfg.Annotations, injectAnnotation)
	if len(cfg.Annotations) == 0 {
		cfg.Annotations = nil
	}
	out, err := yaml.Marshal(&cfg)
	if err != nil {
		return err
	}
	header := fmt.Sprintf("# Made by `go run ./certs` from %s: caBundle is the CA in ca.crt\n# next to this file, so cert-manager's injection annotation is removed.\n", filepath.Base(src))
	if err := os.MkdirAll(filepath.Dir(dst), 0o755); err != nil {
		return err
	}
	return os.WriteFile(dst, append([]byte(header), out...), 0o644)
}
