//! `GET /demo`: a small page that connects as a user and shows notifications
//! live. The token travels in the URL fragment (never sent to the server) and
//! then in the WebSocket subprotocol. The browser SDK's demo replaces it.

use axum::response::Html;

pub async fn page() -> Html<&'static str> {
    Html(PAGE)
}

const PAGE: &str = r#"<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Herald demo</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
 body{font:15px/1.5 system-ui,sans-serif;margin:0;background:#f5f6f8;color:#1d2330}
 header{background:#1d2330;color:#fff;padding:14px 24px;display:flex;gap:16px;align-items:center}
 #state{font-size:13px;padding:2px 10px;border-radius:10px;background:#555}
 #state.open{background:#1f9d55} main{max-width:720px;margin:24px auto;padding:0 16px}
 li{list-style:none;background:#fff;border-radius:8px;padding:10px 14px;margin:8px 0;box-shadow:0 1px 2px #0002}
 code{font-size:13px;color:#555} #hint{color:#777}
</style></head><body>
<header><strong>Herald</strong><span id="user"></span><span id="state">connecting</span></header>
<main><p id="hint">Open this page with <code>#token=&lt;user token&gt;</code> (dev mode prints a ready link).</p><ul id="list"></ul></main>
<script>
const token = new URLSearchParams(location.hash.slice(1)).get('token');
const list = document.getElementById('list'), state = document.getElementById('state');
let since = null, delay = 500;
function connect() {
  if (!token) { state.textContent = 'no token'; return; }
  const url = (location.protocol === 'https:' ? 'wss://' : 'ws://') + location.host + '/v1/ws' + (since === null ? '' : '?since=' + since);
  const ws = new WebSocket(url, ['herald.v1', 'herald.bearer.' + token]);
  ws.onopen = () => { state.textContent = 'open'; state.className = 'open'; delay = 500; };
  ws.onmessage = (e) => {
    const f = JSON.parse(e.data);
    if (f.type === 'welcome') { document.getElementById('user').textContent = f.user_id; if (since === null) since = f.last_seq; }
    if (f.type === 'notification' && f.seq > since) {
      since = f.seq;
      const li = document.createElement('li');
      li.innerHTML = '<strong></strong> <code></code><div></div>';
      li.querySelector('strong').textContent = f.topic;
      li.querySelector('code').textContent = '#' + f.seq + ' · ' + f.created_at;
      li.querySelector('div').textContent = JSON.stringify(f.payload);
      list.prepend(li);
    }
  };
  ws.onclose = (e) => {
    state.textContent = 'reconnecting (' + e.code + ')'; state.className = '';
    if (e.code === 4003) return;
    setTimeout(connect, Math.random() * delay); delay = Math.min(delay * 2, 30000);
  };
}
connect();
</script></body></html>"#;
