package balancer

import (
	"embed"
	"net/http"
	"path"
)

// uiFiles is the status page: plain HTML, CSS and JavaScript served from
// the binary, so that it works offline and matches the running version.
//
//go:embed ui
var uiFiles embed.FS

// uiAssets are the page's files by the path the admin API serves them at.
// The page is the same at / and /ui; it refers to its files and to
// /status relatively, so that it works from either.
var uiAssets = map[string]string{
	"/":             "ui/index.html",
	"/ui":           "ui/index.html",
	"/ui/app.js":    "ui/app.js",
	"/ui/style.css": "ui/style.css",
}

var uiTypes = map[string]string{
	".html": "text/html; charset=utf-8",
	".js":   "text/javascript; charset=utf-8",
	".css":  "text/css; charset=utf-8",
}

// uiPolicy keeps the page to its own files and its own origin: nothing
// else is loaded or connected to (so the admin token it holds goes
// nowhere else), no inline script runs, and no other site may frame it.
const uiPolicy = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; " +
	"connect-src 'self'; form-action 'none'; frame-ancestors 'none'; base-uri 'none'"

// isUIAsset reports whether path is one of the status page's files. They
// hold no data, so they are served without the admin token: the page asks
// for it and sends it with its requests for /status.
func isUIAsset(p string) bool {
	_, ok := uiAssets[p]
	return ok
}

// handleUI registers the status page on the admin mux.
func (a *adminServer) handleUI() {
	for p, file := range uiAssets {
		body, err := uiFiles.ReadFile(file)
		if err != nil {
			panic("BUG: the status page file " + file + " is not embedded: " + err.Error())
		}
		ctype := uiTypes[path.Ext(file)]
		pattern := "GET " + p
		if p == "/" {
			pattern = "GET /{$}"
		}
		a.mux.HandleFunc(pattern, func(w http.ResponseWriter, _ *http.Request) {
			h := w.Header()
			h.Set("Content-Type", ctype)
			h.Set("Content-Security-Policy", uiPolicy)
			h.Set("X-Content-Type-Options", "nosniff")
			h.Set("X-Frame-Options", "DENY")
			h.Set("Referrer-Policy", "no-referrer")
			h.Set("Cross-Origin-Resource-Policy", "same-origin")
			h.Set("Cache-Control", "no-cache")
			w.Write(body)
		})
	}
}
