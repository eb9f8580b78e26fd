// MathJax 3 settings for the site (loaded before docs/javascripts/mathjax/tex-chtml-full.js, which is vendored so
// the equations render offline). Markdown text is typeset; code cells with their outputs, and the API reference, are
// left alone even where they contain a "$" (<pre> and <code> are skipped anyway).
window.MathJax = {
  tex: {
    inlineMath: [["$", "$"], ["\\(", "\\)"]],
    displayMath: [["$$", "$$"], ["\\[", "\\]"]],
    processEscapes: true,
  },
  options: {
    ignoreHtmlClass: "tex2jax_ignore|jp-CodeCell|doc-contents",
  },
};
