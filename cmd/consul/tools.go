//go:build tools

// Package tools pins the Consul release that tests and the demo run against.
// It is a module of its own so that Consul's dependencies never enter the
// main go.mod.
package tools

import _ "github.com/hashicorp/consul"
