"""The dashboard's Jinja2 templates (autoescaped), kept in code so the package needs no data files."""

from __future__ import annotations

BASE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
{% if refresh %}<meta http-equiv="refresh" content="{{ refresh }}">{% endif %}
<title>{{ title }} · tuneserve</title>
<style>
 body{font:14px/1.45 system-ui,sans-serif;margin:0;color:#1d2430;background:#f6f7f9}
 header{background:#1d2430;color:#fff;padding:.6em 1.2em;display:flex;gap:1.5em;align-items:center}
 header a{color:#cfe0ff;text-decoration:none} header .who{margin-left:auto;opacity:.8}
 header form{margin:0} header button{font-size:12px}
 main{padding:1em 1.2em;max-width:1100px}
 table{border-collapse:collapse;width:100%;background:#fff}
 th,td{text-align:left;padding:.35em .6em;border-bottom:1px solid #e3e6ea;vertical-align:top}
 th{background:#eef1f4;font-weight:600} code{font-size:12px}
 .status{padding:.1em .5em;border-radius:.8em;font-size:12px;background:#e3e6ea}
 .status.succeeded{background:#d3f4dc}.status.failed{background:#fbd5d5}
 .status.running{background:#d5e6fb}.status.cancelled{background:#eee}
 .level-error{color:#a40000}.level-warn{color:#8a5a00}
 .charts{display:flex;flex-wrap:wrap;gap:1em}
 .chart{background:#fff;border:1px solid #e3e6ea}
 .panes{display:flex;gap:1em}.pane{flex:1;background:#fff;border:1px solid #e3e6ea;padding:.6em}
 .pane pre{white-space:pre-wrap;min-height:4em}
 textarea{width:100%;box-sizing:border-box} .error{color:#a40000}
 dl{display:grid;grid-template-columns:max-content 1fr;gap:.2em 1em} dt{font-weight:600}
</style></head><body>
<header><strong>tuneserve</strong>
 <a href="/ui">Jobs</a><a href="/ui/chat">Chat</a>
 {% if tenant %}<span class="who">tenant: {{ tenant }}</span>
 {% if logged_in %}<form method="post" action="/ui/logout"><button>Log out</button></form>{% endif %}
 {% endif %}
</header>
<main>{% block main %}{% endblock %}</main></body></html>"""

LOGIN = """{% extends "base" %}{% block main %}
<h1>Log in</h1>
{% if error %}<p class="error" id="login-error">{{ error }}</p>{% endif %}
<form method="post" action="/ui/login">
 <label>API key <input type="password" name="api_key" id="api-key" autocomplete="off"
  required autofocus></label>
 <button type="submit" id="login">Log in</button>
</form>
<p>The key is kept in an HttpOnly cookie for this site only.</p>
{% endblock %}"""

JOBS = """{% extends "base" %}{% block main %}
<h1>Fine-tuning jobs</h1>
{% if not jobs %}<p>No jobs yet. Start one with <code>tuneserve jobs create</code>.</p>{% else %}
<table id="jobs"><thead><tr><th>Job</th><th>Model</th><th>Status</th><th>Progress</th>
<th>Created</th><th>Tuned model</th></tr></thead><tbody>
{% for row in jobs %}
<tr class="job" data-job-id="{{ row.job.id }}" data-status="{{ row.job.status }}">
 <td><a href="/ui/jobs/{{ row.job.id }}">{{ row.job.id }}</a></td>
 <td>{{ row.job.model }}</td>
 <td><span class="status {{ row.job.status }}">{{ row.job.status }}</span></td>
 <td>{% if row.total %}<progress value="{{ row.step }}" max="{{ row.total }}"></progress>
   {{ row.step }}/{{ row.total }}{% else %}–{% endif %}</td>
 <td>{{ row.created }}</td>
 <td>{% if row.job.fine_tuned_model %}<a href="/ui/chat?model={{ row.job.fine_tuned_model|urlencode }}">
   <code>{{ row.job.fine_tuned_model }}</code></a>{% endif %}</td>
</tr>{% endfor %}
</tbody></table>{% endif %}
{% endblock %}"""

JOB = """{% extends "base" %}{% block main %}
<h1>Job <code>{{ job.id }}</code> <span class="status {{ job.status }}" id="job-status">{{ job.status }}</span></h1>
<dl>
 <dt>Base model</dt><dd>{{ job.model }}</dd>
 <dt>Progress</dt><dd>{% if total %}<progress value="{{ step }}" max="{{ total }}"></progress>
   step {{ step }} of {{ total }}{% else %}no step yet{% endif %}</dd>
 <dt>Created</dt><dd>{{ created }}</dd>
 {% if finished %}<dt>Finished</dt><dd>{{ finished }}</dd>{% endif %}
 {% if job.trained_tokens %}<dt>Trained tokens</dt><dd>{{ job.trained_tokens }}</dd>{% endif %}
 <dt>Method</dt><dd>{{ job.method.get("type", "supervised") }}
   {% for k, v in hyperparameters.items() %}· {{ k }} {{ v }} {% endfor %}</dd>
 {% if job.fine_tuned_model %}<dt>Tuned model</dt><dd><code>{{ job.fine_tuned_model }}</code>
   · <a id="try-chat" href="/ui/chat?model={{ job.fine_tuned_model|urlencode }}">try it in chat</a></dd>{% endif %}
 {% if job.error %}<dt>Error</dt><dd class="error">{{ job.error.message }}</dd>{% endif %}
</dl>
<h2>Curves</h2>
{% if charts %}<div class="charts">{% for chart in charts %}{{ chart }}{% endfor %}</div>
{% else %}<p>No metrics reported yet.</p>{% endif %}
{% if evaluation %}<h2>Eval before and after training</h2>
<table id="eval"><thead><tr><th></th><th>before: <code>{{ evaluation.before.model if evaluation.before else "–" }}</code></th>
<th>after: <code>{{ evaluation.after.model if evaluation.after else "–" }}</code></th></tr></thead><tbody>
<tr><td>passed</td>{% for p in (evaluation.before, evaluation.after) %}<td>{% if p %}{{ "%.1f%%"|format(100 * p.pass_rate) }}
  ({{ p.result_counts.passed }} of {{ p.result_counts.total }}){% if p.cached %} · cached{% endif %}{% else %}not yet{% endif %}</td>{% endfor %}</tr>
{% for c in evaluation.criteria %}<tr><td>{{ c.name }}</td><td>{{ c.before }}</td><td>{{ c.after }}</td></tr>{% endfor %}
</tbody></table>
{% if evaluation.changed %}<h3>Items that changed</h3>
<table id="eval-changed"><thead><tr><th>#</th><th>Item</th><th>Before</th><th>After</th></tr></thead><tbody>
{% for r in evaluation.changed %}<tr><td>{{ r.id }}</td><td><code>{{ r.item|tojson }}</code></td>
<td class="{{ r.before }}">{{ r.before }}: <code>{{ r.before_output }}</code></td>
<td class="{{ r.after }}">{{ r.after }}: <code>{{ r.after_output }}</code></td></tr>{% endfor %}
</tbody></table>{% endif %}{% endif %}
<h2>Checkpoints</h2>
{% if checkpoints %}<table id="checkpoints"><thead><tr><th>Step</th><th>Model</th>
<th>Train loss</th><th>Valid loss</th></tr></thead><tbody>
{% for c in checkpoints %}<tr><td>{{ c.step_number }}</td><td><code>{{ c.fine_tuned_model_checkpoint }}</code></td>
<td>{{ fmt(c.metrics.get("train_loss")) }}</td><td>{{ fmt(c.metrics.get("valid_loss")) }}</td></tr>{% endfor %}
</tbody></table>{% else %}<p>No checkpoints yet.</p>{% endif %}
<h2>Events</h2>
<table id="events"><thead><tr><th>Time</th><th>Level</th><th>Message</th></tr></thead><tbody>
{% for e in events %}<tr class="event level-{{ e.level }}"><td>{{ e.time }}</td><td>{{ e.level }}</td>
<td>{{ e.message }}</td></tr>{% endfor %}
</tbody></table>
{% endblock %}"""

CHAT = """{% extends "base" %}{% block main %}
<h1>Chat</h1>
<p>Ask a tuned model and its base model the same question, side by side.</p>
<form id="chat-form">
<div class="panes">
 {% for side, chosen in (("tuned", left), ("base", right)) %}
 <div class="pane"><label>{{ "Model" if side == "tuned" else "Beside" }}
  <select id="model-{{ side }}">
   {% for m in models %}<option value="{{ m }}" {% if m == chosen %}selected{% endif %}>{{ m }}</option>{% endfor %}
  </select></label>
  <pre id="answer-{{ side }}" class="answer" data-done="0"></pre></div>
 {% endfor %}
</div>
<p><textarea id="prompt" rows="3" placeholder="Your message" required></textarea></p>
<p><label>max tokens <input id="max-tokens" type="number" value="64" min="1" max="2048"></label>
 <button type="submit" id="send">Send</button></p>
</form>
<script nonce="{{ nonce }}">
function baseOf(name) {
  return name.startsWith("ft:") ? name.split(":")[1] : name;
}
async function ask(model, prompt, out) {
  out.textContent = ""; out.dataset.done = "0"; out.classList.remove("error");
  const maxTokens = parseInt(document.getElementById("max-tokens").value || "64", 10);
  try {
    const response = await fetch("/v1/chat/completions", {
      method: "POST", credentials: "same-origin",
      headers: {"Content-Type": "application/json", "X-Tuneserve-UI": "1"},
      body: JSON.stringify({model: model, stream: true, max_tokens: maxTokens,
                            messages: [{role: "user", content: prompt}]})});
    if (!response.ok) {
      const body = await response.json().catch(() => ({}));
      throw new Error((body.error && body.error.message) || response.statusText);
    }
    const reader = response.body.getReader(), decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const {value, done} = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, {stream: true});
      let cut;
      while ((cut = buffer.indexOf("\\n\\n")) >= 0) {
        const data = buffer.slice(0, cut).replace(/^data: /, ""); buffer = buffer.slice(cut + 2);
        if (data === "[DONE]") continue;
        const chunk = JSON.parse(data);
        if (chunk.error) throw new Error(chunk.error.message);
        const delta = chunk.choices && chunk.choices[0] && chunk.choices[0].delta;
        if (delta && delta.content) out.textContent += delta.content;
      }
    }
  } catch (err) {
    out.classList.add("error"); out.textContent = "Error: " + err.message;
  }
  out.dataset.done = "1";
}
const left = document.getElementById("model-tuned"), right = document.getElementById("model-base");
left.addEventListener("change", () => {
  const base = baseOf(left.value);
  if ([...right.options].some(o => o.value === base)) right.value = base;
});
document.getElementById("chat-form").addEventListener("submit", (event) => {
  event.preventDefault();
  const prompt = document.getElementById("prompt").value;
  ask(left.value, prompt, document.getElementById("answer-tuned"));
  ask(right.value, prompt, document.getElementById("answer-base"));
});
</script>
{% endblock %}"""

TEMPLATES = {"base": BASE, "login": LOGIN, "jobs": JOBS, "job": JOB, "chat": CHAT}
