package certmanager

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"time"

	cmapi "github.com/cert-manager/cert-manager/pkg/apis/certmanager/v1"
	cmmeta "github.com/cert-manager/cert-manager/pkg/apis/meta/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/util/retry"
	"sigs.k8s.io/controller-runtime/pkg/client"
)

// errIssuing is why Renew refuses a Certificate that is being issued.
var errIssuing = errors.New("an issuance is in flight (Issuing=True) and would absorb the renewal; wait for it (WaitIssued) first")

// Renew asks cert-manager to issue the Certificate namespace/name again now,
// as `cmctl renew` does: it sets the Certificate's Issuing condition to True
// with reason ManuallyTriggered through the status subresource (cmctl's
// pkg/renew with cert-manager's apiutil.SetCertificateCondition). Unlike
// cmctl it refuses while the Certificate is being issued, since that
// issuance would complete with the certificate it already requested and no
// new one would follow, and it retries a write that conflicts with a
// controller's. c's scheme must know cert-manager's types (cmapi.AddToScheme).
func Renew(ctx context.Context, c client.Client, namespace, name string) error {
	err := retry.RetryOnConflict(retry.DefaultRetry, func() error {
		crt := &cmapi.Certificate{}
		if err := c.Get(ctx, client.ObjectKey{Namespace: namespace, Name: name}, crt); err != nil {
			return err
		}
		if trueCondition(crt, cmapi.CertificateConditionIssuing) != nil {
			return errIssuing
		}
		setIssuing(crt)
		return c.Status().Update(ctx, crt)
	})
	if err != nil {
		return fmt.Errorf("triggering issuance of Certificate %s/%s: %w", namespace, name, err)
	}
	return nil
}

// WaitIssued waits until the Certificate namespace/name has been issued at
// revision minRevision or later and has settled: Ready for its current
// generation, with no issuance in flight. It returns that Certificate; its
// Secret then holds the certificate of that revision.
func WaitIssued(ctx context.Context, c client.Client, namespace, name string, minRevision int) (*cmapi.Certificate, error) {
	for {
		crt := &cmapi.Certificate{}
		err := c.Get(ctx, client.ObjectKey{Namespace: namespace, Name: name}, crt)
		if err == nil {
			ready := trueCondition(crt, cmapi.CertificateConditionReady)
			if crt.Status.Revision != nil && *crt.Status.Revision >= minRevision &&
				ready != nil && ready.ObservedGeneration == crt.Generation &&
				trueCondition(crt, cmapi.CertificateConditionIssuing) == nil {
				return crt, nil
			}
			err = fmt.Errorf("revision %v, conditions %+v", revisionString(crt), crt.Status.Conditions)
		}
		select {
		case <-ctx.Done():
			return nil, fmt.Errorf("waiting for Certificate %s/%s to be issued at revision %d or later (last: %v): %w", namespace, name, minRevision, err, ctx.Err())
		case <-time.After(100 * time.Millisecond):
		}
	}
}

// trueCondition returns crt's condition typ if it is True, else nil.
func trueCondition(crt *cmapi.Certificate, typ cmapi.CertificateConditionType) *cmapi.CertificateCondition {
	i := slices.IndexFunc(crt.Status.Conditions, func(cond cmapi.CertificateCondition) bool {
		return cond.Type == typ && cond.Status == cmmeta.ConditionTrue
	})
	if i < 0 {
		return nil
	}
	return &crt.Status.Conditions[i]
}

func revisionString(crt *cmapi.Certificate) string {
	if crt.Status.Revision == nil {
		return "none"
	}
	return fmt.Sprint(*crt.Status.Revision)
}

// setIssuing sets crt's Issuing condition as cmctl renew does.
func setIssuing(crt *cmapi.Certificate) {
	now := metav1.Now()
	cond := cmapi.CertificateCondition{
		Type:               cmapi.CertificateConditionIssuing,
		Status:             cmmeta.ConditionTrue,
		Reason:             "ManuallyTriggered",
		Message:            "Certificate re-issuance manually triggered",
		LastTransitionTime: &now,
		ObservedGeneration: crt.Generation,
	}
	for i, old := range crt.Status.Conditions {
		if old.Type != cond.Type {
			continue
		}
		if old.Status == cond.Status {
			cond.LastTransitionTime = old.LastTransitionTime
		}
		crt.Status.Conditions[i] = cond
		return
	}
	crt.Status.Conditions = append(crt.Status.Conditions, cond)
}
