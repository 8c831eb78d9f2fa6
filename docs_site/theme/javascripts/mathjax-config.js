// MathJax 3 for pymdownx.arithmatex (generic mode): it wraps $...$ in \( \) and $$...$$ in \[ \]
// inside elements of class "arithmatex"; only those are typeset, and the table of contents
// links (a heading's equation is plain text there). The script after this one is
// MathJax itself, served from this site (assets/mathjax/, copied from the PyPI package
// django-static-mathjax by docs_site/hooks.py): no network at view time.
window.MathJax = {
  tex: {
    inlineMath: [["\\(", "\\)"]],
    displayMath: [["\\[", "\\]"]],
    processEscapes: true,
    processEnvironments: true,
    // an undefined macro is an error (merror, which tests/runtime/browser.py reports), not red text
    packages: { "[-]": ["noundefined"] },
  },
  options: {
    ignoreHtmlClass: ".*|",
    processHtmlClass: "arithmatex|md-nav__link",
  },
  svg: { fontCache: "global" },
};
