package runtimetest

import (
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"testing"
)

// RandomHex returns n random bytes in hex: container IDs, unique names.
func RandomHex(t testing.TB, n int) string {
	t.Helper()
	b := make([]byte, n)
	if _, err := rand.Read(b); err != nil {
		t.Fatal(err)
	}
	return hex.EncodeToString(b)
}

// PodUID returns a random pod UID in the API server's form.
func PodUID(t testing.TB) string {
	u := RandomHex(t, 16)
	return fmt.Sprintf("%s-%s-%s-%s-%s", u[:8], u[8:12], u[12:16], u[16:20], u[20:])
}
