// The console's only script: updates the live panel every few seconds without reloading the page.
// Served from the gateway (no framework, no build step, nothing fetched from elsewhere); every
// other page works without it.
"use strict";
(function () {
  const panel = document.getElementById("live-panel");
  if (!panel) return;
  const source = panel.dataset.src;
  const interval = Math.max(1, Number(panel.dataset.interval) || 5) * 1000;
  const status = document.getElementById("live-updated");
  let failures = 0;
  async function update() {
    try {
      const answer = await fetch(source, { credentials: "same-origin", headers: { Accept: "text/html" } });
      if (answer.status === 401 || answer.status === 403) {
        status.textContent = "Signed out: reload the page to sign in again.";
        return; // stop polling
      }
      if (!answer.ok) throw new Error("status " + answer.status);
      panel.innerHTML = await answer.text();
      failures = 0;
      status.textContent = "Updated " + new Date().toLocaleTimeString();
    } catch (err) {
      failures += 1;
      status.textContent = "Update failed (" + err.message + "), retrying.";
    }
    setTimeout(update, interval * Math.min(1 + failures, 6));
  }
  setTimeout(update, interval);
})();
