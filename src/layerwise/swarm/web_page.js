// Replace the page's body with the server's latest rendering (already HTML-escaped there) every second.
"use strict";
(function () {
  const main = document.getElementById("status");
  const conn = document.getElementById("conn");
  let seen = 0;
  async function refresh() {
    try {
      const r = await fetch("fragment", { cache: "no-store" });
      if (!r.ok) throw new Error(r.status);
      main.innerHTML = await r.text();
      conn.hidden = true;
      seen += 1;
      document.body.dataset.refreshes = String(seen);
    } catch (e) {
      conn.hidden = false;
    }
    setTimeout(refresh, 1000);
  }
  setTimeout(refresh, 1000);
})();
