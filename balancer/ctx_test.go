package balancer

import (
	"net"

	"github.com/valyala/fasthttp"
)

func newBenchCtx(req *fasthttp.Request) *fasthttp.RequestCtx {
	ctx := &fasthttp.RequestCtx{}
	ctx.Init(req, &net.TCPAddr{IP: net.IPv4(192, 0, 2, 7), Port: 40000}, nil)
	return ctx
}
