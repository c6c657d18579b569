package cluster

import (
	"errors"
	"fmt"
	"os/exec"
	"strings"
)

// The kubelet writes iptables chains at start (KUBE-IPTABLES-HINT,
// KUBE-KUBELET-CANARY, and KUBE-FIREWALL with a rule in INPUT/OUTPUT that
// drops non-local packets to 127.0.0.0/8) unless makeIPTablesUtilChains is
// false, which the harness sets. Teardown still removes any KUBE-* chain that
// was not there before, and the nftables tables iptables-nft created for
// them, so the host's firewall is as it was.

var iptablesTables = []string{"filter", "nat", "mangle"}

// IptablesState is the firewall before Up: "iptables/filter/CHAIN" entries
// and the nft tables ("ip filter").
type IptablesState struct {
	Chains    []string `json:"chains"`
	NftTables []string `json:"nftTables"`
}

func snapshotIptables() *IptablesState {
	s := &IptablesState{}
	for _, bin := range []string{"iptables", "ip6tables"} {
		for _, t := range iptablesTables {
			for _, ch := range iptablesChains(bin, t) {
				s.Chains = append(s.Chains, bin+"/"+t+"/"+ch)
			}
		}
	}
	s.NftTables = nftTables()
	return s
}

// iptablesChains lists the chains of a table (iptables -S prints "-N CHAIN"
// for user chains and "-P CHAIN POLICY" for built-in ones).
func iptablesChains(bin, table string) []string {
	out, err := exec.Command(bin, "-w", "-t", table, "-S").Output()
	if err != nil {
		return nil
	}
	var chains []string
	for _, l := range strings.Split(string(out), "\n") {
		f := strings.Fields(l)
		if len(f) >= 2 && f[0] == "-N" {
			chains = append(chains, f[1])
		}
	}
	return chains
}

func nftTables() []string {
	out, err := exec.Command("nft", "list", "tables").Output()
	if err != nil {
		return nil
	}
	var ts []string
	for _, l := range strings.Split(strings.TrimSpace(string(out)), "\n") {
		if t := strings.TrimSpace(strings.TrimPrefix(l, "table ")); t != "" && strings.HasPrefix(l, "table ") {
			ts = append(ts, t)
		}
	}
	return ts
}

// restoreIptables removes the KUBE-* chains (and the rules jumping to them)
// that were not in before, then the nft tables that are new and now empty.
func restoreIptables(before *IptablesState) error {
	if before == nil {
		return nil
	}
	had := map[string]bool{}
	for _, c := range before.Chains {
		had[c] = true
	}
	var errs []error
	for _, bin := range []string{"iptables", "ip6tables"} {
		if _, err := exec.LookPath(bin); err != nil {
			continue
		}
		for _, t := range iptablesTables {
			var added []string
			for _, ch := range iptablesChains(bin, t) {
				if strings.HasPrefix(ch, "KUBE-") && !had[bin+"/"+t+"/"+ch] {
					added = append(added, ch)
				}
			}
			if len(added) == 0 {
				continue
			}
			isAdded := map[string]bool{}
			for _, ch := range added {
				isAdded[ch] = true
			}
			// Delete the rules that jump to an added chain, wherever they are.
			out, _ := exec.Command(bin, "-w", "-t", t, "-S").Output()
			for _, l := range strings.Split(string(out), "\n") {
				f := ruleFields(l)
				if len(f) < 2 || f[0] != "-A" {
					continue
				}
				for i := 0; i+1 < len(f); i++ {
					if f[i] == "-j" && isAdded[f[i+1]] {
						args := append([]string{"-w", "-t", t, "-D"}, f[1:]...)
						if o, err := exec.Command(bin, args...).CombinedOutput(); err != nil {
							errs = append(errs, fmt.Errorf("%s %s: %v: %s", bin, strings.Join(args, " "), err, o))
						}
						break
					}
				}
			}
			for _, ch := range added {
				exec.Command(bin, "-w", "-t", t, "-F", ch).Run()
			}
			for _, ch := range added {
				if o, err := exec.Command(bin, "-w", "-t", t, "-X", ch).CombinedOutput(); err != nil {
					errs = append(errs, fmt.Errorf("%s -t %s -X %s: %v: %s", bin, t, ch, err, o))
				}
			}
		}
	}
	// iptables-nft leaves the (now empty) tables it created.
	hadTable := map[string]bool{}
	for _, t := range before.NftTables {
		hadTable[t] = true
	}
	for _, t := range nftTables() {
		if hadTable[t] {
			continue
		}
		fam, name, ok := strings.Cut(t, " ")
		if !ok || (fam != "ip" && fam != "ip6") {
			continue
		}
		bin := map[string]string{"ip": "iptables", "ip6": "ip6tables"}[fam]
		if !iptablesTableEmpty(bin, name) {
			continue // someone else uses it now
		}
		if o, err := exec.Command("nft", "delete", "table", fam, name).CombinedOutput(); err != nil {
			errs = append(errs, fmt.Errorf("nft delete table %s: %v: %s", t, err, o))
		}
	}
	return errors.Join(errs...)
}

// iptablesTableEmpty: no user chains, no rules, built-in policies ACCEPT.
func iptablesTableEmpty(bin, table string) bool {
	out, err := exec.Command(bin, "-w", "-t", table, "-S").Output()
	if err != nil {
		return false
	}
	for _, l := range strings.Split(strings.TrimSpace(string(out)), "\n") {
		f := strings.Fields(l)
		if len(f) == 0 {
			continue
		}
		if f[0] != "-P" || len(f) < 3 || f[2] != "ACCEPT" {
			return false
		}
	}
	return true
}

// ruleFields splits a rule as `iptables -S` prints it into arguments: words,
// and double-quoted strings (kube-proxy's comments) as one argument without
// the quotes; \" and \\ inside quotes are the characters themselves.
func ruleFields(line string) []string {
	var out []string
	var cur strings.Builder
	inWord, quoted := false, false
	for i := 0; i < len(line); i++ {
		ch := line[i]
		switch {
		case quoted && ch == '\\' && i+1 < len(line):
			i++
			cur.WriteByte(line[i])
		case ch == '"':
			quoted, inWord = !quoted, true
		case !quoted && (ch == ' ' || ch == '\t'):
			if inWord {
				out = append(out, cur.String())
				cur.Reset()
				inWord = false
			}
		default:
			cur.WriteByte(ch)
			inWord = true
		}
	}
	if inWord {
		out = append(out, cur.String())
	}
	return out
}
