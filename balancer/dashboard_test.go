package balancer

import (
	"encoding/json"
	"os"
	"regexp"
	"sort"
	"strings"
	"testing"
)

// dashboardPath is the Grafana dashboard for edgelb's metrics.
const dashboardPath = "../configs/grafana-dashboard.json"

// dashboardQuery is one PromQL query of the dashboard, with where it is.
type dashboardQuery struct {
	where, expr, legend string
}

// dashboardQueries returns every query of the dashboard: the panels'
// targets and the variables' label_values queries.
func dashboardQueries(t *testing.T) []dashboardQuery {
	t.Helper()
	data, err := os.ReadFile(dashboardPath)
	if err != nil {
		t.Fatal(err)
	}
	type target struct {
		Expr         string `json:"expr"`
		LegendFormat string `json:"legendFormat"`
		Datasource   struct {
			UID string `json:"uid"`
		} `json:"datasource"`
	}
	type panel struct {
		ID      int      `json:"id"`
		Type    string   `json:"type"`
		Title   string   `json:"title"`
		Targets []target `json:"targets"`
		GridPos *struct {
			H, W, X, Y int
		} `json:"gridPos"`
		Panels []json.RawMessage `json:"panels"`
	}
	var dash struct {
		UID        string  `json:"uid"`
		Title      string  `json:"title"`
		Panels     []panel `json:"panels"`
		Templating struct {
			List []struct {
				Name  string          `json:"name"`
				Type  string          `json:"type"`
				Query json.RawMessage `json:"query"`
			} `json:"list"`
		} `json:"templating"`
	}
	dec := json.NewDecoder(strings.NewReader(string(data)))
	if err := dec.Decode(&dash); err != nil {
		t.Fatalf("%s: %v", dashboardPath, err)
	}
	if dash.UID == "" || dash.Title == "" {
		t.Fatalf("%s: no uid or title", dashboardPath)
	}
	var qs []dashboardQuery
	ids := make(map[int]bool)
	for _, p := range dash.Panels {
		if ids[p.ID] {
			t.Errorf("panel %q: id %d used twice", p.Title, p.ID)
		}
		ids[p.ID] = true
		if p.GridPos == nil || p.GridPos.W == 0 || p.GridPos.H == 0 || p.GridPos.X+p.GridPos.W > 24 {
			t.Errorf("panel %q: bad gridPos %+v", p.Title, p.GridPos)
		}
		if p.Type == "row" {
			if len(p.Panels) != 0 {
				t.Errorf("row %q: collapsed rows hide their panels from this test; keep rows open", p.Title)
			}
			continue
		}
		if len(p.Targets) == 0 {
			t.Errorf("panel %q has no query", p.Title)
		}
		for _, tg := range p.Targets {
			if tg.Datasource.UID != "${datasource}" {
				t.Errorf("panel %q: data source %q, want the ${datasource} variable", p.Title, tg.Datasource.UID)
			}
			qs = append(qs, dashboardQuery{where: "panel " + p.Title, expr: tg.Expr, legend: tg.LegendFormat})
		}
	}
	for _, v := range dash.Templating.List {
		if v.Type != "query" {
			continue
		}
		var q struct {
			Query string `json:"query"`
		}
		if err := json.Unmarshal(v.Query, &q); err != nil {
			// Older Grafana writes the query as a plain string.
			if err := json.Unmarshal(v.Query, &q.Query); err != nil {
				t.Fatalf("variable %s: query %s", v.Name, v.Query)
			}
		}
		qs = append(qs, dashboardQuery{where: "variable " + v.Name, expr: q.Query})
	}
	if len(qs) == 0 {
		t.Fatalf("%s has no queries", dashboardPath)
	}
	return qs
}

var (
	promMetric   = regexp.MustCompile(`\bedgelb_[a-z0-9_]+`)
	promSelector = regexp.MustCompile(`\b(edgelb_[a-z0-9_]+)\s*\{([^}]*)\}`)
	promMatcher  = regexp.MustCompile(`([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)`)
	promGrouping = regexp.MustCompile(`\b(?:by|without)\s*\(([^)]*)\)`)
	labelValues  = regexp.MustCompile(`label_values\(\s*(edgelb_[a-z0-9_]+)[^,]*,\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*\)`)
	legendLabel  = regexp.MustCompile(`\{\{\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*\}\}`)
)

// targetLabels are added by Prometheus to every series it scrapes.
var targetLabels = map[string]bool{"instance": true, "job": true}

// dashboardFamily returns the metricHelp family of a metric name in a
// query: itself, or a histogram's for its _bucket, _sum and _count series.
func dashboardFamily(name string) (family string, ok bool) {
	if _, ok := metricHelp[name]; ok {
		return name, true
	}
	for _, suffix := range []string{"_bucket", "_sum", "_count"} {
		if base, found := strings.CutSuffix(name, suffix); found && metricHelp[base].typ == "histogram" {
			return base, true
		}
	}
	return "", false
}

// TestDashboardMetricsExist: every metric the Grafana dashboard queries is
// one edgelb exports (a family of metricHelp), and every family of
// metricHelp has a panel, so that the dashboard cannot drift from the
// code.
func TestDashboardMetricsExist(t *testing.T) {
	used := make(map[string]bool)
	for _, q := range dashboardQueries(t) {
		names := promMetric.FindAllString(q.expr, -1)
		if len(names) == 0 {
			t.Errorf("%s: %q queries no edgelb metric", q.where, q.expr)
		}
		for _, name := range names {
			f, ok := dashboardFamily(name)
			if !ok {
				t.Errorf("%s: %s is not an edgelb metric (not in metricHelp in balancer/admin.go)", q.where, name)
				continue
			}
			used[f] = true
		}
	}
	var missing []string
	for f := range metricHelp {
		if !used[f] {
			missing = append(missing, f)
		}
	}
	sort.Strings(missing)
	for _, f := range missing {
		t.Errorf("%s has no panel for %s: add one to configs/grafana-dashboard.json", dashboardPath, f)
	}
}

// TestDashboardLabelsExist: every label the dashboard groups by, matches
// on, or shows in a legend is one that the metrics it queries carry, as
// /metrics of a running edgelb shows them (with Consul discovery, hedging,
// a backend given by host name, a backup set, a TLS listener and every
// per-service family present).
func TestDashboardLabelsExist(t *testing.T) {
	o := startOrigin(t, "o", nil)
	// A Consul address where nothing listens: the watch is made, and
	// counts its errors.
	pki := newTestPKI(t)
	cert, key := pki.issue("shop", "shop.example")
	s := startEdge(t, "consul: {address: "+deadAddr(t)+", tag_routes: false}\n"+
		"tls: {listen: 127.0.0.1:0, certs: [{cert: "+cert+", key: "+key+"}]}\nservices:\n"+
		"  web: {static: "+staticList(o)+", hedge: {after: 50ms}}\n"+
		"  api: {consul: {name: api}}\n"+
		"  named: {static: [localhost:1], backup: [127.0.0.1:2]}\n"+
		"routes: [{service: web}, {path: /api, service: api}, {path: /named, service: named}]\n")
	do(t, s, "GET", "shop.example", "/")
	code, exposition := adminGet(t, s, "/metrics")
	if code != 200 {
		t.Fatalf("/metrics: %d", code)
	}
	labels := make(map[string]map[string]bool) // by sample name
	for _, line := range strings.Split(exposition, "\n") {
		if line == "" || line[0] == '#' {
			continue
		}
		name, rest, _ := strings.Cut(line, "{")
		name, _, _ = strings.Cut(name, " ")
		if labels[name] == nil {
			labels[name] = make(map[string]bool)
		}
		if body, _, ok := strings.Cut(rest, "}"); ok {
			for _, m := range promMatcher.FindAllStringSubmatch(body, -1) {
				labels[name][m[1]] = true
			}
		}
	}
	// Series that appear only once something happened that this test does
	// not make happen: Consul answering for a service with datacenter
	// failover (no agent here), an HTTP/2 client's protocol error. Their
	// labels, as the code makes them.
	for name, ls := range map[string][]string{
		"edgelb_discovery_failovers_total":    {"service", "from", "to"},
		"edgelb_discovery_datacenter_serving": {"service", "datacenter"},
		"edgelb_http2_errors_total":           {"scope", "code"},
	} {
		if labels[name] == nil {
			labels[name] = make(map[string]bool)
			for _, l := range ls {
				labels[name][l] = true
			}
		}
	}
	has := func(name, label string) bool {
		return targetLabels[label] || labels[name][label]
	}
	for _, q := range dashboardQueries(t) {
		names := promMetric.FindAllString(q.expr, -1)
		for _, name := range names {
			if labels[name] == nil {
				t.Errorf("%s: %s is not on /metrics of the test edge: export it there, or give this test what makes it appear", q.where, name)
			}
		}
		for _, m := range promSelector.FindAllStringSubmatch(q.expr, -1) {
			for _, l := range promMatcher.FindAllStringSubmatch(m[2], -1) {
				if !has(m[1], l[1]) {
					t.Errorf("%s: %s has no label %q", q.where, m[1], l[1])
				}
			}
		}
		// A grouping or legend label must be on every metric of the query.
		var grouped []string
		for _, m := range promGrouping.FindAllStringSubmatch(q.expr, -1) {
			for _, l := range strings.Split(m[1], ",") {
				grouped = append(grouped, strings.TrimSpace(l))
			}
		}
		for _, m := range legendLabel.FindAllStringSubmatch(q.legend, -1) {
			grouped = append(grouped, m[1])
		}
		for _, l := range grouped {
			for _, name := range names {
				if !has(name, l) {
					t.Errorf("%s: %s has no label %q to group by or show", q.where, name, l)
				}
			}
		}
		for _, m := range labelValues.FindAllStringSubmatch(q.expr, -1) {
			if !has(m[1], m[2]) {
				t.Errorf("%s: %s has no label %q for its values", q.where, m[1], m[2])
			}
		}
	}
}
