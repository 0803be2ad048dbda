// Post the picture with fetch and show the answer; the form's action already carries the
// endpoint's prefix (url_for), so this works at /serve/<id> and /serve/<id>/ alike.
(function () {
  const form = document.getElementById("upload");
  const file = document.getElementById("file");
  const status = document.getElementById("status");
  const original = document.getElementById("original");
  const result = document.getElementById("result");
  const submit = document.getElementById("submit");

  function show(message, isError) {
    status.textContent = message;
    status.className = isError ? "error" : "";
  }

  file.addEventListener("change", function () {
    if (file.files.length) original.src = URL.createObjectURL(file.files[0]);
  });

  form.addEventListener("submit", async function (event) {
    event.preventDefault();
    submit.disabled = true;
    result.removeAttribute("src");
    result.dataset.ready = "";
    show("Colourising…", false);
    try {
      const answer = await fetch(form.action, { method: "POST", body: new FormData(form) });
      if (!answer.ok) {
        let reason = answer.statusText;
        try { reason = (await answer.json()).message || reason; } catch (e) { /* not JSON */ }
        throw new Error(reason);
      }
      const blob = await answer.blob();
      result.onload = function () { result.dataset.ready = "1"; show("Done.", false); };
      result.src = URL.createObjectURL(blob);
    } catch (err) {
      show("Failed: " + err.message, true);
    } finally {
      submit.disabled = false;
    }
  });
})();
