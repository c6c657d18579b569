package app_test

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"strings"
	"testing"
	"time"

	admissionv1 "k8s.io/api/admission/v1"
	coordinationv1 "k8s.io/api/coordination/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/kubernetes"
	"k8s.io/utils/ptr"

	"github.com/kubediskguard/kubediskguard/shared/limits"
	"github.com/kubediskguard/kubediskguard/webhook/app"
	"github.com/kubediskguard/kubediskguard/webhook/mutate"
)

// A replica whose Lease is taken from it (as when a starved API server lets
// the renew deadline pass) stops its policy controller, keeps serving
// admission, campaigns again, and runs the controller again once it holds
// the Lease.
func TestALostLeaseStopsThePolicyControllerNotTheWebhook(t *testing.T) {
	p := controlPlane(t)
	cs, _ := p.clientset(t)
	ctx := context.Background()
	isolatedNamespace(t, cs, lostNS)
	createPod(t, cs, lostNS, testPod("a", nil))
	lease := p.leaseNamespace(t)
	r := startPolicyRunWith(t, p, p.cfg, "lost", func(o *app.Options) {
		o.Lease = app.LeaseTimings{LeaseDuration: ptr.To(2 * time.Second), RenewDeadline: ptr.To(time.Second), RetryPeriod: ptr.To(200 * time.Millisecond)}
	}, "--leader-election-namespace="+lease)
	eventually(t, 30*time.Second, "the webhook leading", func() error {
		if !r.leads() {
			return errors.New("not yet")
		}
		return nil
	})

	// Another holder takes the Lease and keeps it for now.
	stealLease(t, cs, lease, "thief", time.Hour)
	const stopped = "campaigns for the Lease again"
	eventually(t, 30*time.Second, "the policy controller stopping", func() error {
		if !strings.Contains(r.log.String(), stopped) {
			return errors.New("not yet")
		}
		return nil
	})
	select {
	case err := <-r.exited:
		t.Fatalf("the webhook exited on losing the Lease: %v\n%s", err, r.log)
	default:
	}
	// Still serving: a pod of an opted-in namespace is stamped.
	if patch := admit(t, p, r.port, p.namespace(t, true, nil)); !strings.Contains(patch, limits.ResolvedAnnotation) && !strings.Contains(patch, strings.ReplaceAll(limits.ResolvedAnnotation, "/", "~1")) {
		t.Errorf("admission after losing the Lease answered patch %q, want the stamp", patch)
	}
	// Not leading: opting a namespace in changes nothing.
	setNamespace(t, cs, lostNS, optIn)
	time.Sleep(3 * time.Second)
	if n := len(r.writesIn(lostNS)); n != 0 {
		t.Fatalf("the webhook made %d pod writes without the Lease:\n%s", n, r.log)
	}

	// The holder goes away: the webhook leads again and the controller catches up.
	if err := cs.CoordinationV1().Leases(lease).Delete(ctx, app.LeaseName, metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	waitStamps(t, cs, lostNS, 30*time.Second, map[string]limits.Resolved{"a": {"app": at500}})
	if n := strings.Count(r.log.String(), "Starting Controller"); n != 2 {
		t.Errorf("the policy controller started %d times, want 2 (before and after the lost Lease):\n%s", n, r.log)
	}
	l, err := cs.CoordinationV1().Leases(lease).Get(ctx, app.LeaseName, metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if h := ptr.Deref(l.Spec.HolderIdentity, ""); h == "thief" || h == "" {
		t.Errorf("the Lease is held by %q after the webhook led again", h)
	}
}

// stealLease makes holder the Lease's holder for d, as another replica that
// won it would.
func stealLease(t *testing.T, cs kubernetes.Interface, ns, holder string, d time.Duration) {
	t.Helper()
	eventually(t, 10*time.Second, "taking the Lease", func() error {
		l, err := cs.CoordinationV1().Leases(ns).Get(context.Background(), app.LeaseName, metav1.GetOptions{})
		if err != nil {
			return err
		}
		now := metav1.NewMicroTime(time.Now())
		l.Spec = coordinationv1.LeaseSpec{HolderIdentity: &holder, LeaseDurationSeconds: ptr.To(int32(d.Seconds())),
			AcquireTime: &now, RenewTime: &now, LeaseTransitions: ptr.To(ptr.Deref(l.Spec.LeaseTransitions, 0) + 1)}
		_, err = cs.CoordinationV1().Leases(ns).Update(context.Background(), l, metav1.UpdateOptions{})
		if apierrors.IsConflict(err) {
			return err // the holder renewed meanwhile
		}
		if err != nil {
			t.Fatal(err)
		}
		return nil
	})
}

// admit sends the run's webhook the admission of a new pod in namespace ns
// over TLS and returns the JSON patch it answered.
func admit(t *testing.T, p *plane, port, ns string) string {
	t.Helper()
	pool := x509.NewCertPool()
	pool.AppendCertsFromPEM(p.env.WebhookInstallOptions.LocalServingCAData)
	c := &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: pool, ServerName: "127.0.0.1", MinVersion: tls.VersionTLS12}}}
	pod, err := json.Marshal(testPod("admitted", nil))
	if err != nil {
		t.Fatal(err)
	}
	review := admissionv1.AdmissionReview{
		TypeMeta: metav1.TypeMeta{APIVersion: "admission.k8s.io/v1", Kind: "AdmissionReview"},
		Request: &admissionv1.AdmissionRequest{
			UID: types.UID("lost-lease"), Namespace: ns, Operation: admissionv1.Create,
			Kind:     metav1.GroupVersionKind{Version: "v1", Kind: "Pod"},
			Resource: metav1.GroupVersionResource{Version: "v1", Resource: "pods"},
			Object:   runtime.RawExtension{Raw: pod},
		},
	}
	body, err := json.Marshal(review)
	if err != nil {
		t.Fatal(err)
	}
	resp, err := c.Post(fmt.Sprintf("https://127.0.0.1:%s%s", port, mutate.Path), "application/json", bytes.NewReader(body))
	if err != nil {
		t.Fatalf("admission request: %v", err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	var got admissionv1.AdmissionReview
	if err := json.Unmarshal(b, &got); err != nil || got.Response == nil {
		t.Fatalf("admission answer %s: %s (%v)", resp.Status, b, err)
	}
	if !got.Response.Allowed || got.Response.UID != review.Request.UID {
		t.Fatalf("admission answer %s", b)
	}
	return string(got.Response.Patch)
}
