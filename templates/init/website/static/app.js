// Preview the chosen image and show progress while the upload runs. Plain JS, no build step.
const input = document.getElementById("file");
const preview = document.getElementById("preview");

input.addEventListener("change", () => {
  const file = input.files[0];
  if (file && file.type.startsWith("image/")) {
    preview.src = URL.createObjectURL(file);
    preview.hidden = false;
  } else {
    preview.hidden = true;
  }
});

document.querySelector("form").addEventListener("submit", (event) => {
  const button = event.target.querySelector("button");
  button.disabled = true;
  button.textContent = "Analysing…";
});
