"""HTML loading: block structure kept (no split at inline tags), navigation boilerplate dropped, sections."""

from __future__ import annotations

from pathlib import Path

from ragloop.retrieval.loaders import html_blocks, load_file

PAGE = """<!doctype html><html><head><title>Server guide</title><script>var x = "<p>no</p>";</script></head>
<body><header class="site-header"><a href="/">Home</a> <a href="/docs">Docs</a></header>
<nav aria-label="main"><ul><li><a href="/a">Getting started</a></li><li><a href="/b">API</a></li></ul></nav>
<div id="sidebar"><h3>Related articles</h3><ul><li>How to bake bread</li></ul></div>
<main>
  <article><header><h1>The admin server</h1></header>
  <p>The <b>admin</b> server listens on <code>port 8443</code> by <a href="#d">default</a>.</p>
  <h2>Install</h2>
  <ul><li>Run <code>make install</code> first.</li><li>Then start it.</li></ul>
  <pre>port = 8443
host = "0.0.0.0"</pre>
  <table><tr><th>option</th><th>default</th></tr><tr><td>port</td><td>8443</td></tr></table>
  </article>
</main>
<div class="cookie-banner">We use cookies to improve your experience.</div>
<footer><p>© 2024 Example Corp. All rights reserved.</p></footer></body></html>"""


def test_blocks_keep_sentences_and_drop_boilerplate():
    blocks, title = html_blocks(PAGE)
    assert title == "Server guide"
    texts = [t for _, t in blocks]
    assert ("text", "The admin server listens on port 8443 by default.") in blocks  # one sentence, not 5 lines
    assert ("item", "Run make install first.") in blocks
    assert ("pre", 'port = 8443\nhost = "0.0.0.0"') in blocks
    assert ("text", "option | default") in blocks and ("text", "port | 8443") in blocks
    joined = " ".join(texts)
    for noise in ("Getting started", "Related articles", "bake bread", "cookies", "All rights reserved", "Home",
                  "var x"):
        assert noise not in joined


def test_loaded_document_has_one_segment_per_section(tmp_path: Path):
    p = tmp_path / "guide.html"
    p.write_text(PAGE, encoding="utf-8")
    doc = load_file(p)
    assert doc.title == "Server guide"
    assert [s.metadata.get("section") for s in doc.segments] == ["The admin server", "Install"]
    assert doc.segments[0].text == "## The admin server\n\nThe admin server listens on port 8443 by default."
    assert "- Run make install first." in doc.segments[1].text


def test_page_without_landmarks_keeps_its_body_and_fragments():
    blocks, title = html_blocks("<p>Just <i>one</i> line.</p><div>Another <span>block</span></div>")
    assert title == "" and blocks == [("text", "Just one line."), ("text", "Another block")]
    # a heading is the title when there is no <title>
    assert html_blocks("<h1>Doc</h1><p>x</p>")[1] == "Doc"
