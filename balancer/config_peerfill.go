package balancer

import (
	"fmt"
	"os"
	"strings"
	"time"

	"github.com/edgelb/edgelb/balancer/fleet"
)

// PeerFillConfig is consul.peer_fill: when an instance would answer with a
// stored copy but has none, it asks the other instances of its fleet for
// theirs. The zero value of every field selects its default. It is on with
// consul.register.
type PeerFillConfig struct {
	// Disabled turns peer fill off: the instance neither asks its peers
	// nor answers them.
	Disabled bool `yaml:"disabled"`

	// Timeout bounds one fill, every peer asked included.
	// DefaultPeerFillTimeout is used if not set.
	Timeout time.Duration `yaml:"timeout"`

	// MaxPeers is how many ready peers one fill asks at once.
	// DefaultPeerFillMaxPeers is used if not set.
	MaxPeers int `yaml:"max_peers"`

	// Secret is shared by the instances of the fleet: a peer's request
	// must carry it. SecretFile, when set, names a file holding it
	// instead; LoadConfig and ParseConfig fill Secret from it. Without
	// either, the secret is kept in Consul under SecretKey.
	Secret     string `yaml:"secret"`
	SecretFile string `yaml:"secret_file"`

	// SecretKey is the Consul KV key that keeps the secret when neither
	// Secret nor SecretFile is set: the first instance that finds it
	// empty writes a random one, and every instance follows it.
	// fleet.DefaultSecretKey is used if not set.
	SecretKey string `yaml:"secret_key"`

	// Address is the host advertised to peers for the admin listener,
	// where they ask for copies. The admin listener's host is used if not
	// set, or, when it listens on every address, the host advertised for
	// listen (consul.register.address).
	Address string `yaml:"address"`
}

// Defaults of PeerFillConfig.
const (
	DefaultPeerFillTimeout  = 50 * time.Millisecond
	DefaultPeerFillMaxPeers = 3

	maxPeerFillTimeout  = 10 * time.Second
	maxPeerFillMaxPeers = 16
)

// applyDefaults fills in every unset field that has a default.
func (c *PeerFillConfig) applyDefaults() {
	setDefault(&c.Timeout, DefaultPeerFillTimeout)
	setDefault(&c.MaxPeers, DefaultPeerFillMaxPeers)
	setDefault(&c.SecretKey, fleet.DefaultSecretKey)
}

// validate checks c after applyDefaults, reading secret_file; register
// tells whether consul.register is set. It returns every problem, each
// naming its key under path.
func (c *PeerFillConfig) validate(path string, register bool) []error {
	var errs []error
	bad := func(key, format string, args ...any) {
		errs = append(errs, fmt.Errorf("%s: "+format, append([]any{path + key}, args...)...))
	}
	if c.Timeout <= 0 || c.Timeout > maxPeerFillTimeout {
		bad(".timeout", "must be above 0 and at most %v (got %v)", maxPeerFillTimeout, c.Timeout)
	}
	if c.MaxPeers < 1 || c.MaxPeers > maxPeerFillMaxPeers {
		bad(".max_peers", "must be between 1 and %d (got %d)", maxPeerFillMaxPeers, c.MaxPeers)
	}
	key := ".secret"
	if c.SecretFile != "" {
		key = ".secret_file"
		if c.Secret != "" {
			bad(".secret", "set either secret or secret_file, not both")
		} else if data, err := os.ReadFile(c.SecretFile); err != nil {
			bad(key, "cannot read the secret: %v", err)
		} else if c.Secret = strings.TrimSpace(string(data)); c.Secret == "" {
			bad(key, "%q is empty", c.SecretFile)
		}
	}
	if c.Secret != "" {
		// It travels as a bearer token.
		if err := checkBearerToken(c.Secret); err != nil {
			bad(key, "%v", strings.Replace(err.Error(), "token", "secret", -1))
		}
	}
	if err := fleet.CheckKey(c.SecretKey); err != nil {
		bad(".secret_key", "%v", err)
	}
	if strings.ContainsAny(c.Address, "/ []") || strings.Count(c.Address, ":") == 1 {
		bad(".address", "%q: want a host name or IP address, without a port (the port is the admin listener's)", c.Address)
	}
	if c.Secret != "" && !c.Disabled && !register {
		bad("", "needs consul.register: the peers are the instances registered under its name")
	}
	return errs
}

// on reports whether peer fill runs under c, given consul.register.
func (c *PeerFillConfig) on(register bool) bool {
	return register && !c.Disabled
}
