"""`report.html` opened in headless Chromium (Debian's /usr/bin/chromium, driven by Playwright):
the sections are there, every image loaded, and the screenshot is not a blank page."""

from __future__ import annotations

from tests.browser import chromium_page
from tests.test_report import make_run_folder


def test_report_renders_in_chromium_with_every_section_and_image(tmp_path):
    from PIL import Image

    from instructkit.report import write_report

    report = write_report(tmp_path, make_run_folder(tmp_path))
    shot = tmp_path / "report.png"
    with chromium_page() as page:
        page.goto(report.as_uri())
        page.wait_for_load_state("load")
        headings = page.locator("section > h2").all_inner_texts()
        images = page.evaluate("""() => [...document.images].map(
            i => ({alt: i.alt, complete: i.complete, width: i.naturalWidth, height: i.naturalHeight}))""")
        tables = page.locator("#results table.results").count()
        sample_rows = page.locator("#samples table.samples tr").count()
        page.screenshot(path=str(shot), full_page=True)

    assert [h.split(",")[0] for h in headings] == [
        "Summary",
        "Held-out results",
        "Training curves",
        "Sample responses on held-out prompts",
    ]
    assert [i["alt"] for i in images] == ["sft curves", "dpo curves"]
    assert all(i["complete"] and i["width"] > 100 and i["height"] > 100 for i in images), images
    assert tables == 3 and sample_rows == 1 + 3
    picture = Image.open(shot).convert("RGB")
    assert picture.width >= 800 and picture.height >= 600
    colours = picture.getcolors(maxcolors=1 << 16)
    assert colours is None or len(colours) > 50  # plots and text, not an empty page
