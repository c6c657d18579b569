package realtest

import (
	"os"
	"path/filepath"
	"testing"

	"go.uber.org/zap/zapcore"
	logf "sigs.k8s.io/controller-runtime/pkg/log"
	"sigs.k8s.io/controller-runtime/pkg/log/zap"
)

// KubeAssets returns $KUBEBUILDER_ASSETS, the folder of the pinned
// Kubernetes binaries (make test-bins), after checking that it holds bins.
func KubeAssets(t testing.TB, bins ...string) string {
	t.Helper()
	assets := os.Getenv("KUBEBUILDER_ASSETS")
	for _, bin := range bins {
		if _, err := os.Stat(filepath.Join(assets, bin)); assets == "" || err != nil {
			Missing(t, bin+" in $KUBEBUILDER_ASSETS", "make test-bins, or make test")
		}
	}
	return assets
}

// Log sends the components' logs (controller-runtime's logger) to stderr:
// errors only, or also info and V(1) debug when KDG_TEST_VERBOSE is set.
func Log() {
	level := zapcore.ErrorLevel
	if os.Getenv("KDG_TEST_VERBOSE") != "" {
		level = zapcore.DebugLevel
	}
	logf.SetLogger(zap.New(zap.WriteTo(os.Stderr), zap.UseDevMode(true), zap.Level(level), zap.StacktraceLevel(zapcore.PanicLevel)))
}
