package report

import (
	"fmt"
	"html/template"
	"io"
	"os"
	"sort"
	"strconv"
	"strings"

	"github.com/go-echarts/go-echarts/v2/charts"
	"github.com/go-echarts/go-echarts/v2/opts"

	"github.com/edgelb/edgelb/bench/loadgen"
)

// HTMLOptions tune the HTML report. The zero value loads ECharts from
// go-echarts' default assets host.
type HTMLOptions struct {
	// EchartsJS is a local echarts.min.js inlined into the report, so that
	// it opens without network access. Unset, the report loads ECharts
	// from AssetsHost.
	EchartsJS string
	// AssetsHost is where echarts.min.js is loaded from when EchartsJS is
	// not set; go-echarts' default host is used if not set.
	AssetsHost string
}

// WriteHTML writes the report as one HTML page: per scenario a summary
// table, edgelb/peer ratios, and charts over time of requests/s, latency
// percentiles and errors by cause, with the scenario's events marked.
func (r *Report) WriteHTML(w io.Writer, h HTMLOptions) error {
	page := htmlPage{Report: r}
	if h.EchartsJS != "" {
		js, err := os.ReadFile(h.EchartsJS)
		if err != nil {
			return fmt.Errorf("cannot read -echarts-js: %w", err)
		}
		page.InlineJS = template.JS(js)
	} else {
		host := h.AssetsHost
		if host == "" {
			host = defaultAssetsHost
		}
		page.ScriptSrc = strings.TrimSuffix(host, "/") + "/" + opts.EchartsJS
	}
	ids := 0
	for i := range r.Scenarios {
		page.Sections = append(page.Sections, newSection(&r.Scenarios[i], &ids))
	}
	return pageTmpl.Execute(w, page)
}

// defaultAssetsHost is go-echarts' default host of echarts.min.js.
const defaultAssetsHost = "https://go-echarts.github.io/go-echarts-assets/assets/"

type htmlPage struct {
	*Report
	InlineJS  template.JS
	ScriptSrc string
	Sections  []section
}

type section struct {
	*Scenario
	Rows   []row
	Charts []template.HTML
	// HasFailover is set when a run measured a failover.
	HasFailover bool
}

// row is one run in the summary table.
type row struct {
	*Run
	Causes string
}

func newSection(s *Scenario, ids *int) section {
	sec := section{Scenario: s}
	for i := range s.Runs {
		run := &s.Runs[i]
		sec.Rows = append(sec.Rows, row{Run: run, Causes: causes(run)})
		sec.HasFailover = sec.HasFailover || run.Failover != nil
	}
	runs := make([]*Run, 0, len(s.Runs))
	for i := range s.Runs {
		if s.Runs[i].Result != nil {
			runs = append(runs, &s.Runs[i])
		}
	}
	if len(runs) == 0 {
		return sec
	}
	sec.Charts = append(sec.Charts, snippet(rpsChart(s, runs, ids)))
	for _, run := range runs {
		sec.Charts = append(sec.Charts, snippet(latencyChart(s, run, ids)), snippet(errorsChart(s, run, ids)))
		if run.Failover != nil {
			sec.Charts = append(sec.Charts, snippet(originsChart(s, run, ids)))
		}
	}
	return sec
}

// snippet renders a chart's element and script.
func snippet(c *charts.RectChart) template.HTML {
	s := c.RenderSnippet()
	return template.HTML(s.Element + "\n" + s.Script)
}

// seconds is the x axis: "0", "1", ... up to the longest run.
func seconds(runs []*Run) []string {
	n := 0
	for _, r := range runs {
		n = max(n, len(r.Result.Seconds))
	}
	xs := make([]string, n)
	for i := range xs {
		xs[i] = strconv.Itoa(i)
	}
	return xs
}

// baseOpts are the options every chart shares.
func baseOpts(title, subtitle, yName, yType string, ids *int) []charts.GlobalOpts {
	*ids++
	return []charts.GlobalOpts{
		charts.WithInitializationOpts(opts.Initialization{Width: "1100px", Height: "340px", ChartID: fmt.Sprintf("chart%d", *ids)}),
		charts.WithTitleOpts(opts.Title{Title: title, Subtitle: subtitle}),
		charts.WithTooltipOpts(opts.Tooltip{Show: opts.Bool(true), Trigger: "axis"}),
		charts.WithLegendOpts(opts.Legend{Show: opts.Bool(true), Top: "5%", Right: "2%"}),
		charts.WithGridOpts(opts.Grid{Top: "22%", Left: "7%", Right: "3%"}),
		charts.WithXAxisOpts(opts.XAxis{Name: "s", Type: "category"}),
		charts.WithYAxisOpts(opts.YAxis{Name: yName, Type: yType}),
		charts.WithAnimation(false),
	}
}

// eventLines marks the run's events as vertical lines at their second.
func eventLines(run *Run) []charts.SeriesOpts {
	if len(run.Events) == 0 {
		return nil
	}
	items := make([]opts.MarkLineNameXAxisItem, 0, len(run.Events))
	for _, e := range run.Events {
		items = append(items, opts.MarkLineNameXAxisItem{Name: fmt.Sprintf("%s (%.2fs)", e.Name, e.T), XAxis: strconv.Itoa(int(e.T))})
	}
	return []charts.SeriesOpts{
		charts.WithMarkLineNameXAxisItemOpts(items...),
		charts.WithMarkLineStyleOpts(opts.MarkLineStyle{
			Symbol:    []string{"none", "none"},
			Label:     &opts.Label{Show: opts.Bool(true), Formatter: "{b}", Position: "insideEndTop"},
			LineStyle: &opts.LineStyle{Type: "dashed", Color: "#c23531"},
		}),
	}
}

func rpsChart(s *Scenario, runs []*Run, ids *int) *charts.RectChart {
	c := charts.NewLine()
	c.SetGlobalOptions(baseOpts(s.Title+": requests/s", "per second of load; events marked", "req/s", "value", ids)...)
	c.SetXAxis(seconds(runs))
	for i, run := range runs {
		data := make([]opts.LineData, len(run.Result.Seconds))
		for j, sec := range run.Result.Seconds {
			data[j] = opts.LineData{Value: sec.RPS}
		}
		var so []charts.SeriesOpts
		if i == 0 {
			so = eventLines(run)
		}
		c.AddSeries(run.Proxy, data, so...)
	}
	return &c.RectChart
}

func latencyChart(s *Scenario, run *Run, ids *int) *charts.RectChart {
	c := charts.NewLine()
	c.SetGlobalOptions(baseOpts(s.Title+": latency through "+run.Proxy, "percentiles per second, ms (log scale)", "ms", "log", ids)...)
	c.SetXAxis(seconds([]*Run{run}))
	pick := []struct {
		name string
		f    func(l *loadgen.Percentiles) float64
	}{
		{"p50", func(l *loadgen.Percentiles) float64 { return l.P50 }},
		{"p90", func(l *loadgen.Percentiles) float64 { return l.P90 }},
		{"p99", func(l *loadgen.Percentiles) float64 { return l.P99 }},
		{"p99.9", func(l *loadgen.Percentiles) float64 { return l.P999 }},
	}
	for i, p := range pick {
		data := make([]opts.LineData, len(run.Result.Seconds))
		for j := range run.Result.Seconds {
			l := &run.Result.Seconds[j].Latency
			if run.Result.Seconds[j].Requests == 0 {
				data[j] = opts.LineData{Value: "-"} // no requests completed: a gap, not 0
				continue
			}
			data[j] = opts.LineData{Value: p.f(l)}
		}
		var so []charts.SeriesOpts
		if i == 0 {
			so = eventLines(run)
		}
		c.AddSeries(p.name, data, so...)
	}
	return &c.RectChart
}

func errorsChart(s *Scenario, run *Run, ids *int) *charts.RectChart {
	// Stacked bars split every error by status (>= 400) or transport
	// failure, so that they add up to the errors; lines show the
	// Edgelb-Error codes among them and the answers served stale.
	stacked, lines := map[string][]float64{}, map[string][]float64{}
	n := len(run.Result.Seconds)
	add := func(m map[string][]float64, key string, i int, v int64) {
		if m[key] == nil {
			m[key] = make([]float64, n)
		}
		m[key][i] += float64(v)
	}
	for i, sec := range run.Result.Seconds {
		for st, v := range sec.ByStatus {
			if st >= 400 {
				add(stacked, "status "+strconv.Itoa(st), i, v)
			}
		}
		for k, v := range sec.ByTransport {
			add(stacked, "transport: "+k, i, v)
		}
		for k, v := range sec.ByEdgelbError {
			add(lines, "Edgelb-Error: "+k, i, v)
		}
		if sec.Stale > 0 {
			add(lines, "served stale", i, sec.Stale)
		}
	}
	c := charts.NewBar()
	c.SetGlobalOptions(baseOpts(s.Title+": errors through "+run.Proxy, "per second, by cause", "requests", "value", ids)...)
	c.SetXAxis(seconds([]*Run{run}))
	first := true
	series := func() []charts.SeriesOpts {
		if !first {
			return nil
		}
		first = false
		return eventLines(run)
	}
	for _, k := range sortedKeys(stacked) {
		data := make([]opts.BarData, n)
		for i, v := range stacked[k] {
			data[i] = opts.BarData{Value: v}
		}
		c.AddSeries(k, data, append(series(), charts.WithBarChartOpts(opts.BarChart{Stack: "errors"}))...)
	}
	if len(stacked) == 0 {
		// An empty series carries the event lines and says "no errors".
		data := make([]opts.BarData, n)
		for i := range data {
			data[i] = opts.BarData{Value: 0}
		}
		c.AddSeries("errors (none)", data, series()...)
	}
	if len(lines) > 0 {
		l := charts.NewLine()
		for _, k := range sortedKeys(lines) {
			data := make([]opts.LineData, n)
			for i, v := range lines[k] {
				data[i] = opts.LineData{Value: v}
			}
			l.AddSeries(k, data)
		}
		c.Overlap(l)
	}
	return &c.RectChart
}

// originsChart stacks the answers of each second by the origin that gave
// them, requests with no answer under "no answer".
func originsChart(s *Scenario, run *Run, ids *int) *charts.RectChart {
	f := run.Failover
	n := len(run.Result.Seconds)
	names := map[string]bool{}
	for _, sec := range f.BySecond {
		for o := range sec {
			names[o] = true
		}
	}
	c := charts.NewBar()
	c.SetGlobalOptions(baseOpts(s.Title+": who answered through "+run.Proxy, "answers per second by origin (X-Origin); "+f.Backup+" is the backup", "requests", "value", ids)...)
	c.SetXAxis(seconds([]*Run{run}))
	first := true
	for _, o := range sortedKeys(names) {
		data := make([]opts.BarData, n)
		for i := range data {
			var v int64
			if i < len(f.BySecond) {
				v = f.BySecond[i][o]
			}
			data[i] = opts.BarData{Value: v}
		}
		name := o
		if name == "" {
			name = "no answer"
		}
		so := []charts.SeriesOpts{charts.WithBarChartOpts(opts.BarChart{Stack: "origins"})}
		if first {
			so = append(so, eventLines(run)...)
			first = false
		}
		c.AddSeries(name, data, so...)
	}
	return &c.RectChart
}

func sortedKeys[V any](m map[string]V) []string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	return keys
}

// causes lists a run's errors by cause in words, for the summary table.
func causes(run *Run) string {
	if run.Result == nil {
		return ""
	}
	var parts []string
	for _, st := range sortedInts(run.Result.ByStatus) {
		if st >= 400 {
			parts = append(parts, fmt.Sprintf("%d: %d", st, run.Result.ByStatus[st]))
		}
	}
	for _, k := range sortedKeys(run.Result.ByEdgelbError) {
		parts = append(parts, fmt.Sprintf("%s: %d", k, run.Result.ByEdgelbError[k]))
	}
	for _, k := range sortedKeys(run.Result.ByTransport) {
		parts = append(parts, fmt.Sprintf("%s: %d", k, run.Result.ByTransport[k]))
	}
	return strings.Join(parts, ", ")
}

func sortedInts(m map[int]int64) []int {
	keys := make([]int, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	sort.Ints(keys)
	return keys
}

var pageTmpl = template.Must(template.New("report").Funcs(template.FuncMap{
	"f": func(prec int, v float64) string { return strconv.FormatFloat(v, 'f', prec, 64) },
	"ms": func(v float64) string {
		if v < 0 {
			return "never"
		}
		return strconv.FormatFloat(v, 'f', 1, 64)
	},
	"counts": func(m map[string]int64) string {
		var parts []string
		for _, k := range sortedKeys(m) {
			name := k
			if name == "" {
				name = "no answer"
			}
			parts = append(parts, fmt.Sprintf("%s %d", name, m[k]))
		}
		return strings.Join(parts, ", ")
	},
	"ratio": func(v float64) string {
		if v == 0 {
			return "n/a"
		}
		return strconv.FormatFloat(v, 'f', 2, 64) + "x"
	},
}).Parse(`<!DOCTYPE html>
<html>
<head>
<meta charset="utf-8">
<title>edgelb bench report</title>
{{if .InlineJS}}<script>{{.InlineJS}}</script>{{else}}<script src="{{.ScriptSrc}}"></script>{{end}}
<style>
body { font-family: sans-serif; margin: 2em; color: #222; }
table { border-collapse: collapse; margin: 0.8em 0; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.6em; text-align: right; }
th { background: #f3f3f3; }
td.l, th.l { text-align: left; }
.err { color: #b00; }
.container { margin: 1em 0; }
</style>
</head>
<body>
<h1>edgelb bench report</h1>
<p>Started {{.Start.Format "2006-01-02 15:04:05 MST"}} on {{.Host.CPUs}} CPUs ({{.Host.GoVersion}}).
Load per run: {{f 0 .Settings.DurationS}}s, {{.Settings.Concurrency}} connections,
{{if .Settings.Rate}}{{f 0 .Settings.Rate}} requests/s (open loop; latency counts from when each request was due){{else}}closed loop (each connection sends its next request when the last one is answered){{end}}.
{{if .Host.Pinned}}Proxies pinned to CPU {{.Host.ProxyCPUs}} with one worker (edgelb GOMAXPROCS, nginx worker_processes, HAProxy nbthread); load tool, origins and Consul on the other CPUs.{{else}}Processes not pinned to CPUs.{{end}}
{{range $k, $v := .Host.Peers}}{{$k}}: {{$v}}. {{end}}</p>
<p>Errors are every answer that is not 2xx/3xx plus requests with no answer. CPU per request is the proxy's user+system time (all its processes, from /proc/PID/stat) during the load divided by the requests. Ratios are edgelb divided by the peer: above 1 is better for requests/s, below 1 is better for CPU per request and p99.</p>
<h2>Contents</h2>
<ul>{{range .Sections}}<li><a href="#{{.Name}}">{{.Title}}</a>{{if .Error}} <span class="err">(failed)</span>{{end}}</li>{{end}}</ul>
{{range .Sections}}
<h2 id="{{.Name}}">{{.Title}}</h2>
<p>{{.Description}}</p>
{{if .Error}}<p class="err">Scenario failed: {{.Error}}</p>{{end}}
<table>
<tr><th class="l">proxy</th><th>requests</th><th>req/s</th><th>p50 ms</th><th>p90 ms</th><th>p99 ms</th><th>p99.9 ms</th><th>max ms</th><th>errors</th><th>stale</th><th>CPU µs/req</th><th class="l">errors by cause</th><th class="l">events</th></tr>
{{range .Rows}}{{if .Result}}<tr><td class="l">{{.Proxy}}</td><td>{{.Result.Requests}}</td><td>{{f 0 .Result.RPS}}</td><td>{{f 2 .Result.Latency.P50}}</td><td>{{f 2 .Result.Latency.P90}}</td><td>{{f 2 .Result.Latency.P99}}</td><td>{{f 2 .Result.Latency.P999}}</td><td>{{f 2 .Result.Latency.Max}}</td><td{{if .Result.Errors}} class="err"{{end}}>{{.Result.Errors}}</td><td>{{.Result.Stale}}</td><td>{{f 1 .CPUPerRequestUS}}</td><td class="l">{{.Causes}}</td><td class="l">{{range .Events}}{{f 2 .T}}s {{.Name}}<br>{{end}}{{range .Notes}}{{.}}<br>{{end}}</td></tr>
{{else}}<tr><td class="l">{{.Proxy}}</td><td class="l err" colspan="12">{{.Error}}</td></tr>
{{end}}{{if and .Result .Error}}<tr><td class="l">{{.Proxy}}</td><td class="l err" colspan="12">{{.Error}}</td></tr>{{end}}{{end}}
</table>
{{if .Comparisons}}<table>
<tr><th class="l">edgelb / peer</th><th>req/s</th><th>CPU per request</th><th>p99</th><th>errors (edgelb vs peer)</th></tr>
{{range .Comparisons}}<tr><td class="l">edgelb / {{.Peer}}</td><td>{{ratio .RPSRatio}}</td><td>{{ratio .CPUPerRequestRatio}}</td><td>{{ratio .P99Ratio}}</td><td>{{.Errors}} vs {{.PeerErrors}}</td></tr>
{{end}}</table>{{end}}
{{if .HasFailover}}<table>
<tr><th class="l">failover</th><th>kill -9 of the primaries took ms</th><th>kill to first backup answer ms</th><th>kill to every answer from the backup ms</th><th>errors in the outage</th><th>slowest request in the outage ms</th><th>restart to first primary answer ms</th><th>restart to every answer from primaries ms</th><th>primaries' share of the last second</th><th class="l">answers by origin: before / outage / after</th></tr>
{{range .Rows}}{{if .Failover}}<tr><td class="l">{{.Proxy}}</td>{{with .Failover}}<td>{{f 1 .KillMS}}</td><td>{{ms .FirstBackupMS}}</td><td>{{ms .AllBackupMS}}</td><td{{if .OutageErrors}} class="err"{{end}}>{{.OutageErrors}}</td><td>{{f 1 .OutageMaxMS}}</td><td>{{ms .FirstPrimaryMS}}</td><td>{{ms .AllPrimaryMS}}</td><td>{{f 1 .LastSecondPrimaryPercent}}%</td><td class="l">{{counts .Before}} / {{counts .Outage}} / {{counts .After}}</td>{{end}}</tr>
{{end}}{{end}}</table>{{end}}
{{with .Propagation}}<table>
<tr><th class="l">Consul change to routing change</th><th>changes</th><th>p50 ms</th><th>max ms</th><th>not seen in time</th><th class="l">each (ms, in order)</th></tr>
<tr><td class="l">register / deregister</td><td>{{len .RegisterMS}} / {{len .DeregisterMS}}</td><td>{{f 1 .P50MS}}</td><td>{{f 1 .MaxMS}}</td><td>{{.Missed}}</td><td class="l">register: {{range .RegisterMS}}{{f 0 .}} {{end}}<br>deregister: {{range .DeregisterMS}}{{f 0 .}} {{end}}</td></tr>
</table>{{end}}
{{range .Charts}}{{.}}
{{end}}
{{end}}
</body>
</html>
`))
