// Package config binds command-line flags to environment variables the same
// way for both binaries: an environment variable sets a flag's value, a flag
// on the command line overrides it, and a bad value of either is an error
// that names the flag or the variable.
package config

import (
	"errors"
	"flag"
	"fmt"
	"io"
	"strconv"
	"strings"
	"time"
)

// FlagSet is a flag.FlagSet whose flags may be set by environment variables.
type FlagSet struct {
	*flag.FlagSet
	env []binding
}

type binding struct{ flag, env string }

// NewFlagSet returns an empty FlagSet that reports errors instead of exiting.
func NewFlagSet(name string) *FlagSet {
	fs := flag.NewFlagSet(name, flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	return &FlagSet{FlagSet: fs}
}

// Env makes the environment variable env set the flag named flagName. The
// variable's name is added to the flag's usage.
func (fs *FlagSet) Env(flagName, env string) {
	f := fs.Lookup(flagName)
	if f == nil {
		panic(fmt.Sprintf("config: no flag %q to bind to %s", flagName, env))
	}
	f.Usage += " [$" + env + "]"
	fs.env = append(fs.env, binding{flagName, env})
}

// Parse applies the environment (through lookupEnv, normally os.LookupEnv),
// then the command-line arguments. Every bad value is reported, each naming
// its variable or flag.
func (fs *FlagSet) Parse(args []string, lookupEnv func(string) (string, bool)) error {
	var errs []error
	for _, b := range fs.env {
		if v, ok := lookupEnv(b.env); ok {
			if err := fs.Set(b.flag, v); err != nil {
				errs = append(errs, fmt.Errorf("invalid value %q for environment variable %s: %w", v, b.env, err))
			}
		}
	}
	if err := fs.FlagSet.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return err
		}
		errs = append(errs, err)
	}
	if fs.NArg() > 0 {
		errs = append(errs, fmt.Errorf("unexpected arguments: %q", fs.Args()))
	}
	return errors.Join(errs...)
}

// Usage renders the flags' help text.
func (fs *FlagSet) Usage() string {
	var b strings.Builder
	fmt.Fprintf(&b, "Usage of %s:\n", fs.Name())
	fs.SetOutput(&b)
	fs.PrintDefaults()
	fs.SetOutput(io.Discard)
	return b.String()
}

// StringList is a comma-separated list flag; blank items are dropped.
type StringList []string

// Set implements flag.Value.
func (l *StringList) Set(s string) error {
	*l = nil
	for item := range strings.SplitSeq(s, ",") {
		if item = strings.TrimSpace(item); item != "" {
			*l = append(*l, item)
		}
	}
	return nil
}

// String implements flag.Value.
func (l *StringList) String() string { return strings.Join(*l, ",") }

// Seconds is a duration flag written as a whole number of seconds (the
// seed-compatible form of CHECK_INTERVAL) or as a Go duration ("30s").
type Seconds time.Duration

// Set implements flag.Value.
func (s *Seconds) Set(v string) error {
	v = strings.TrimSpace(v)
	if n, err := strconv.ParseUint(v, 10, 32); err == nil {
		*s = Seconds(time.Duration(n) * time.Second)
		return nil
	}
	d, err := time.ParseDuration(v)
	if err != nil || d < 0 {
		return errors.New("want a whole number of seconds or a duration such as 30s")
	}
	*s = Seconds(d)
	return nil
}

// String implements flag.Value.
func (s *Seconds) String() string { return time.Duration(*s).String() }
