// Command coredns is CoreDNS with only the plugins the one-node test cluster's Corefile may
// use (apilane.testing.cluster.corefile): cluster names from the API server, no forwarding
// and none of the cloud back ends, whose SDKs made the stock build take many minutes.
package main

import (
	"github.com/coredns/coredns/core/dnsserver"
	"github.com/coredns/coredns/coremain"

	_ "github.com/coredns/coredns/plugin/bind"
	_ "github.com/coredns/coredns/plugin/cache"
	_ "github.com/coredns/coredns/plugin/errors"
	_ "github.com/coredns/coredns/plugin/health"
	_ "github.com/coredns/coredns/plugin/kubernetes"
	_ "github.com/coredns/coredns/plugin/log"
	_ "github.com/coredns/coredns/plugin/loop"
	_ "github.com/coredns/coredns/plugin/ready"
	_ "github.com/coredns/coredns/plugin/reload"
)

// directives is the plugin chain order: the relative order these plugins have in CoreDNS's
// own plugin.cfg (a plugin sees a query before every plugin listed after it).
var directives = []string{
	"reload",
	"bind",
	"ready",
	"health",
	"errors",
	"log",
	"cache",
	"kubernetes",
	"loop",
}

func main() {
	// The Corefile parser accepts exactly these names; the stock list would name plugins
	// that are not compiled in.
	dnsserver.Directives = directives
	coremain.Run()
}
