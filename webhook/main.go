// Command kubediskguard-webhook is the mutating admission webhook that stamps
// each pod of an opted-in namespace with its resolved disk IO limits.
package main

import (
	"errors"
	"flag"
	"fmt"
	"os"

	ctrl "sigs.k8s.io/controller-runtime"
	"sigs.k8s.io/controller-runtime/pkg/log/zap"

	"github.com/kubediskguard/kubediskguard/webhook/app"
)

func main() {
	o, err := app.ParseOptions(os.Args[1:], os.LookupEnv)
	if errors.Is(err, flag.ErrHelp) {
		fmt.Println(err)
		os.Exit(0)
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "kubediskguard-webhook:", err)
		os.Exit(2)
	}
	ctrl.SetLogger(zap.New(zap.UseFlagOptions(&o.Log)))
	log := ctrl.Log.WithName("kubediskguard-webhook")
	cfg, err := o.RESTConfig()
	if err == nil {
		err = app.Run(ctrl.LoggerInto(ctrl.SetupSignalHandler(), log), o, cfg)
	}
	if err != nil {
		log.Error(err, "exiting")
		os.Exit(1)
	}
}
