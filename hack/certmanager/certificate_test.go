package certmanager

import (
	"bufio"
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"

	cmapi "github.com/cert-manager/cert-manager/pkg/apis/certmanager/v1"
	cmmeta "github.com/cert-manager/cert-manager/pkg/apis/meta/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/client/fake"
)

func TestRenewSetsTheIssuingConditionAsCmctlDoesAndRefusesDuringAnIssuance(t *testing.T) {
	ctx := context.Background()
	scheme := runtime.NewScheme()
	if err := cmapi.AddToScheme(scheme); err != nil {
		t.Fatal(err)
	}
	ready := cmapi.CertificateCondition{Type: cmapi.CertificateConditionReady, Status: cmmeta.ConditionTrue, Reason: "Ready", ObservedGeneration: 3}
	crt := &cmapi.Certificate{
		ObjectMeta: metav1.ObjectMeta{Namespace: "ns", Name: "crt", Generation: 3},
		Status:     cmapi.CertificateStatus{Conditions: []cmapi.CertificateCondition{ready}},
	}
	c := fake.NewClientBuilder().WithScheme(scheme).WithObjects(crt).WithStatusSubresource(crt).Build()

	if err := Renew(ctx, c, "ns", "crt"); err != nil {
		t.Fatal(err)
	}
	got := &cmapi.Certificate{}
	if err := c.Get(ctx, client.ObjectKey{Namespace: "ns", Name: "crt"}, got); err != nil {
		t.Fatal(err)
	}
	issuing := trueCondition(got, cmapi.CertificateConditionIssuing)
	if issuing == nil || issuing.Reason != "ManuallyTriggered" || issuing.Message != "Certificate re-issuance manually triggered" ||
		issuing.ObservedGeneration != 3 || issuing.LastTransitionTime == nil {
		t.Fatalf("conditions after Renew: %+v; want Issuing=True, reason ManuallyTriggered, observedGeneration 3, a transition time", got.Status.Conditions)
	}
	if len(got.Status.Conditions) != 2 || got.Status.Conditions[0].Type != cmapi.CertificateConditionReady {
		t.Errorf("conditions after Renew: %+v; want Ready kept as it was", got.Status.Conditions)
	}

	if err := Renew(ctx, c, "ns", "crt"); !errors.Is(err, errIssuing) {
		t.Errorf("Renew during an issuance: %v, want %v", err, errIssuing)
	}
}

// The CRDs come from the cert-manager module the product requires; the
// controllers that serve them must be the same release.
func TestCertManagerLocalIsBuiltFromTheCertManagerReleaseTheProductRequires(t *testing.T) {
	product := requiredVersion(t, filepath.Join("..", "..", "go.mod"))
	tool := requiredVersion(t, filepath.Join("..", "tools", "certmanager", "go.mod"))
	if product != tool {
		t.Errorf("the product requires %s %s, hack/tools/certmanager builds %s: pin the same (see hack/tools/certmanager/README.md)", Module, product, tool)
	}
}

// requiredVersion returns the version of Module that gomod requires.
func requiredVersion(t *testing.T, gomod string) string {
	t.Helper()
	f, err := os.Open(gomod)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		fields := strings.Fields(strings.TrimPrefix(strings.TrimSpace(sc.Text()), "require "))
		if len(fields) >= 2 && fields[0] == Module {
			return fields[1]
		}
	}
	if err := sc.Err(); err != nil {
		t.Fatal(err)
	}
	t.Fatalf("%s does not require %s", gomod, Module)
	return ""
}
