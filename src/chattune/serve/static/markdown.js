// Model answers as Markdown, through markdown-it (vendor/markdown-it.min.js, MIT, loaded before
// this file; nothing is fetched from elsewhere): CommonMark with tables, nested lists, fenced code
// and strikethrough. No raw HTML from the model ever reaches the page (html: false shows it as
// text); links are http(s) or mailto only and open in a new tab without the page as opener;
// images are not loaded (a model's image link would make the browser call another host);
// headings start at h3 (inside a message). The page's Content-Security-Policy backs this up.
"use strict";

const Markdown = (() => {
  const md = window.markdownit({html: false, linkify: true, breaks: true, typographer: false});
  md.disable("image");
  md.validateLink = (url) => /^(https?:|mailto:)/i.test(url.trim());

  function escapeHtml(text) {
    return text.replace(/&/g, "&amp;").replace(/</g, "&lt;").replace(/>/g, "&gt;")
      .replace(/"/g, "&quot;").replace(/'/g, "&#39;");
  }

  const rules = md.renderer.rules;
  rules.link_open = (tokens, idx, options, env, self) => {
    tokens[idx].attrSet("target", "_blank");
    tokens[idx].attrSet("rel", "noopener noreferrer");
    return self.renderToken(tokens, idx, options);
  };
  const shifted = (tokens, idx, options, env, self) => {
    tokens[idx].tag = "h" + Math.min(Number(tokens[idx].tag.slice(1)) + 2, 6);
    return self.renderToken(tokens, idx, options);
  };
  rules.heading_open = shifted;
  rules.heading_close = shifted;
  rules.fence = (tokens, idx) => {
    // an unclosed fence (an answer still streaming) shows what has come so far
    const token = tokens[idx];
    const lang = token.info.trim().split(/\s+/)[0];
    const attr = lang ? ' data-lang="' + escapeHtml(lang) + '"' : "";
    return "<pre" + attr + "><code>" + escapeHtml(token.content.replace(/\n$/, "")) + "</code></pre>";
  };

  function render(source) {
    return md.render(source);
  }

  return {render, escapeHtml};
})();
