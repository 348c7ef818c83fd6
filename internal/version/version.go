// Package version tells which build of edgelb is running, for
// `edgelb -version` and the admin API's /status.
package version

import (
	"fmt"
	"runtime"
	"runtime/debug"
)

// version is set by `make build` with
// -ldflags "-X github.com/edgelb/edgelb/internal/version.version=..."
// (git describe of the source tree); empty in other builds.
var version string

// Version returns the version the build was stamped with, else the module
// version from the build info (a tagged module that `go install` built), else
// the VCS revision go build recorded, else "devel".
func Version() string {
	if version != "" {
		return version
	}
	bi, ok := debug.ReadBuildInfo()
	if !ok {
		return "devel"
	}
	if v := bi.Main.Version; v != "" && v != "(devel)" {
		return v
	}
	if rev, modified := vcs(bi); rev != "" {
		if len(rev) > 12 {
			rev = rev[:12]
		}
		if modified {
			rev += "-dirty"
		}
		return rev
	}
	return "devel"
}

// String returns the line `edgelb -version` prints: the version, the
// revision and its time when go build recorded them, the Go version and
// the platform.
func String() string {
	s := "edgelb " + Version()
	if bi, ok := debug.ReadBuildInfo(); ok {
		if rev, modified := vcs(bi); rev != "" {
			s += " (commit " + rev
			if modified {
				s += ", modified"
			}
			if t := setting(bi, "vcs.time"); t != "" {
				s += ", " + t
			}
			s += ")"
		}
	}
	return s + fmt.Sprintf(" %s %s/%s", runtime.Version(), runtime.GOOS, runtime.GOARCH)
}

// vcs returns the revision go build recorded and whether the tree had
// changes; "" when it recorded none (go test, -buildvcs=false, no git).
func vcs(bi *debug.BuildInfo) (rev string, modified bool) {
	return setting(bi, "vcs.revision"), setting(bi, "vcs.modified") == "true"
}

func setting(bi *debug.BuildInfo, key string) string {
	for _, s := range bi.Settings {
		if s.Key == key {
			return s.Value
		}
	}
	return ""
}
