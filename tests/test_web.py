"""The web page in headless Chromium: sign up -> recommendations -> a rating updates them in place;
a title like <script>alert(1)</script> shows as text and runs nothing. Skipped without Chromium
(.ci/run installs Debian's chromium and chromium-driver)."""
from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest

pytest.importorskip("httpx")
pytest.importorskip("fastapi")
webdriver = pytest.importorskip("selenium.webdriver")

from click.testing import CliRunner  # noqa: E402
from selenium.common.exceptions import NoAlertPresentException  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import Select, WebDriverWait  # noqa: E402
from sqlalchemy import text  # noqa: E402

from cfb.cli.main import cli  # noqa: E402
from cfb.db.engine import make_engine  # noqa: E402

from .test_http import XSS, running_server  # noqa: E402

CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(not (CHROMIUM and Path(CHROMEDRIVER).exists()),
                                reason="needs Debian's chromium and chromium-driver")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--window-size=1200,1000"]


@pytest.fixture
def browser(tmp_path):
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in FLAGS + [f"--user-data-dir={tmp_path / 'chromium-profile'}"]:
        opts.add_argument(flag)
    opts.set_capability("unhandledPromptBehavior", "ignore")  # an alert must stay visible to the check
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


def no_alert(driver) -> bool:
    try:
        driver.switch_to.alert
    except NoAlertPresentException:
        return True
    return False


def rec_items(driver) -> list[str]:
    return [li.get_attribute("data-item") for li in driver.find_elements(By.CSS_SELECTOR, "#recs > li")]


def test_signup_recommend_rate_update_in_place(trained, db_url, tmp_path, browser):
    csv = tmp_path / "items.csv"  # an item whose title is markup: it must show as text and run nothing
    csv.write_text(f'item,title\na1,"{XSS}"\n', encoding="utf-8")
    assert CliRunner().invoke(cli, ["--db", db_url, "ingest", "items", str(csv)]).exit_code == 0
    wait = WebDriverWait(browser, 20)
    with running_server(db_url) as base:
        browser.get(base + "/?budget=30")
        assert no_alert(browser)
        titles = [e.text for e in browser.find_elements(By.CSS_SELECTOR, ".rate-items .title")]
        assert XSS in titles  # shown as text
        named = [e.get_attribute("aria-label") for e in browser.find_elements(By.CSS_SELECTOR, ".rate-items select")]
        assert named == [f"rating for {t}" for t in titles]  # a screen reader says which item each control rates
        Select(browser.find_element(By.CSS_SELECTOR, "select[data-attr='gender']")).select_by_visible_text("F")
        browser.find_element(By.ID, "user-id").send_keys("browser1")
        for sel in browser.find_elements(By.CSS_SELECTOR, ".rate-items select")[:6]:
            Select(sel).select_by_value("5" if sel.get_attribute("data-item").startswith("a") else "1")
        shown = len(browser.find_elements(By.CSS_SELECTOR, ".rate-items select"))
        browser.find_element(By.ID, "signup-submit").click()
        wait.until(lambda d: "/user/browser1" in d.current_url)
        wait.until(lambda d: len(rec_items(d)) == 10)
        assert no_alert(browser)
        with make_engine(db_url).connect() as conn:  # the page said how many items it showed
            assert conn.scalar(text("SELECT a.asked FROM answers a JOIN users u ON u.id = a.user_id "
                                    "WHERE u.external_id = 'browser1'")) == shown > 6
        browser.get(base + "/explore?n=5")  # from any page, a way back to the recommendations of who signed up
        my_recs = browser.find_element(By.ID, "my-recs")
        assert my_recs.is_displayed() and my_recs.get_attribute("href") == base + "/user/browser1"
        browser.back()
        wait.until(lambda d: "/user/browser1" in d.current_url and len(rec_items(d)) == 10)
        browser.back()  # the form comes back as it was left, maybe mid-submit, from the page cache
        wait.until(lambda d: "/user/" not in d.current_url)
        wait.until(lambda d: d.find_element(By.ID, "signup-submit").is_enabled())  # (another may sign up)
        # (drawn before this browser signed up, shown again as it was: the way back is there all the same)
        assert browser.find_element(By.ID, "my-recs").is_displayed()
        browser.forward()
        wait.until(lambda d: "/user/browser1" in d.current_url and len(rec_items(d)) == 10)
        before = rec_items(browser)
        first = browser.find_element(By.CSS_SELECTOR, "#recs > li select")
        Select(first).select_by_value("1")  # rate the top recommendation: the list updates in place
        browser.find_element(By.CSS_SELECTOR, "#recs > li button.rate").click()
        wait.until(lambda d: d.find_element(By.ID, "recs").get_attribute("data-updated"))
        after = rec_items(browser)
        assert len(after) == 10 and before[0] not in after and after != before
        shown_titles = [a.text for a in browser.find_elements(By.CSS_SELECTOR, "#recs a.title")]
        assert [e.get_attribute("aria-label") for e in browser.find_elements(By.CSS_SELECTOR, "#recs select")] \
            == [f"rating for {t}" for t in shown_titles]  # (the list the script drew, too)
        assert "Rated" in browser.find_element(By.ID, "rate-status").text
        # the title set apart from the sentence (a right-to-left one took ": 1" into its run)
        assert browser.find_element(By.CSS_SELECTOR, "#rate-status bdi").text in browser.find_element(By.ID, "rate-status").text
        assert browser.find_element(By.ID, "rate-error").text == ""

        # all of the user's unrated items: the markup title is among them, as text
        browser.get(base + "/user/browser1?n=100")
        links = [a.text for a in browser.find_elements(By.CSS_SELECTOR, "#recs a.title")]
        if "a1" in rec_items(browser):
            assert XSS in links
        browser.get(base + "/item/a1")
        assert browser.find_element(By.ID, "item-title").text == XSS
        assert len(browser.find_elements(By.CSS_SELECTOR, "#similar li")) == 10
        browser.get(base + "/explore?n=40")
        assert browser.find_elements(By.CSS_SELECTOR, "#pca svg circle")
        assert XSS in browser.execute_script(  # (as text: each point's title on hover)
            "return [...document.querySelectorAll('#pca svg title')].map(t => t.textContent)")
        assert no_alert(browser)
        assert browser.execute_script("return document.querySelectorAll('main script').length") == 0


def test_two_ratings_in_quick_succession_store_the_last_one_chosen(trained, db_url, browser):
    """A user who changes a rating twice before the first is answered: the second is stored last. The
    page's first POST is held back 400 ms, as a slow connection would (sent at once, the second
    overtook it and the first value was stored while the status showed the second)."""
    wait = WebDriverWait(browser, 20)
    with running_server(db_url) as base:
        browser.get(base + "/user/a0")
        wait.until(lambda d: len(rec_items(d)) == 10)
        browser.execute_script("""
            var fetched = window.fetch, held = false;
            window.postsAnswered = 0;
            window.fetch = function (url, opts) {
              if (!(opts && opts.method === "POST")) { return fetched(url, opts); }
              var wait = held ? 0 : 400;
              held = true;
              return new Promise(function (ok) { setTimeout(ok, wait); })
                .then(function () { return fetched(url, opts); })
                .then(function (r) { window.postsAnswered += 1; return r; });
            };""")
        sel = browser.find_element(By.CSS_SELECTOR, "#recs > li select")
        item = sel.get_attribute("data-item")
        browser.execute_script("""
            var sel = arguments[0], button = sel.closest("li").querySelector("button.rate");
            sel.value = "5"; button.click();
            sel.value = "1"; button.click();""", sel)
        wait.until(lambda d: d.execute_script("return window.postsAnswered") == 2)
        assert browser.find_element(By.ID, "rate-status").text.endswith(": 1")
    engine = make_engine(db_url)
    with engine.connect() as conn:
        assert conn.execute(text("SELECT r.rating FROM ratings r JOIN users u ON u.id = r.user_id JOIN items i "
                                 "ON i.id = r.item_id WHERE u.external_id = 'a0' AND i.external_id = :item"),
                            {"item": item}).scalar() == 1.0
    engine.dispose()


def test_rating_the_last_item_says_none_is_left(trained, db_url, browser):
    """A user who has rated every item but one rates it on the page: the list empties and the page
    says why (an empty list said nothing); the CLI says the same."""
    from cfb.service.ratings import rate_item
    from cfb.service.serving import NOTHING_LEFT, recommend

    engine, _ = trained
    with engine.connect() as conn:
        unrated = [it["item"] for it in recommend(conn, "a0", n=100)["items"]]
    for item in unrated[1:]:
        rate_item(engine, "a0", item, 3)
    wait = WebDriverWait(browser, 20)
    with running_server(db_url) as base:
        browser.get(base + "/user/a0")
        assert rec_items(browser) == unrated[:1] and not browser.find_element(By.ID, "no-recs").is_displayed()
        Select(browser.find_element(By.CSS_SELECTOR, "#recs > li select")).select_by_value("4")
        browser.find_element(By.CSS_SELECTOR, "#recs > li button.rate").click()
        wait.until(lambda d: d.execute_script(  # (in one script: the list may be redrawn between two calls)
            "return !document.querySelector('#recs > li') && !document.getElementById('no-recs').hidden"))
        assert browser.find_element(By.ID, "no-recs").text == NOTHING_LEFT.capitalize() + "."
        browser.get(base + "/user/a0")
        assert browser.find_element(By.ID, "no-recs").is_displayed()
    res = CliRunner().invoke(cli, ["--db", db_url, "recommend", "a0"])
    assert res.exit_code == 0 and res.output.splitlines() == [
        "user a0 (predicted rating, title):", f"  ({NOTHING_LEFT})"], res.output


def test_no_way_back_link_before_anyone_signs_up_in_this_browser(trained, db_url, browser):
    with running_server(db_url) as base:
        browser.get(base + "/explore?n=5")
        assert not browser.find_element(By.ID, "my-recs").is_displayed()


def test_a_keyboard_user_rates_only_on_enter_or_the_button_and_keeps_their_place(trained, db_url, browser):
    """Arrow keys on a closed rating list move its value and send nothing (Chromium fires "change" on each:
    one Down arrow rated the item 1 and dropped it from the list); Enter sends it, and the focus comes back
    to the list at the same place in the re-ranked list (it fell to the page's body)."""
    from selenium.webdriver.common.keys import Keys

    wait = WebDriverWait(browser, 20)
    with running_server(db_url) as base:
        browser.get(base + "/user/a0")
        wait.until(lambda d: len(rec_items(d)) == 10)
        before = rec_items(browser)
        second = browser.find_elements(By.CSS_SELECTOR, "#recs > li select")[1]
        second.send_keys(Keys.ARROW_DOWN)  # (focuses it and moves its value to the first rating)
        second.send_keys(Keys.ARROW_DOWN)
        time.sleep(0.8)
        assert browser.find_element(By.ID, "rate-status").text == "" and rec_items(browser) == before
        assert Select(second).first_selected_option.get_attribute("value") != ""
        second.send_keys(Keys.ENTER)
        wait.until(lambda d: d.find_element(By.ID, "recs").get_attribute("data-updated"))
        assert browser.find_element(By.ID, "rate-status").text.startswith("Rated ")
        focused = browser.switch_to.active_element
        assert focused.tag_name == "select" and focused == browser.find_elements(By.CSS_SELECTOR, "#recs > li select")[1]
        focused.send_keys(Keys.TAB)
        assert browser.switch_to.active_element.get_attribute("class") == "rate"
        browser.switch_to.active_element.send_keys(Keys.ENTER)  # (the button, with no rating chosen: said so)
        wait.until(lambda d: d.find_element(By.ID, "rate-error").text == "Choose a rating first.")


def test_api_docs_render_offline(trained, db_url, browser):
    """Swagger UI comes from a pip package, not a CDN: the docs page renders with no network."""
    with running_server(db_url) as base:
        browser.get(base + "/docs")
        WebDriverWait(browser, 20).until(lambda d: d.find_elements(By.CSS_SELECTOR, ".swagger-ui .opblock"))
        text = browser.find_element(By.CSS_SELECTOR, ".swagger-ui").text
        assert "/users/{user}/recommendations" in text and "cfb" in text
        loaded = browser.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
        assert loaded and all(u.startswith(base) for u in loaded), loaded


def test_bad_input_on_a_page_shows_an_html_error_with_a_link_back(trained, db_url, browser):
    """A page asked with bad input (a hand-edited URL) shows the one-line error as text, not a JSON body."""
    with running_server(db_url) as base:
        for path, message, heading in (
                ("/?budget=99", "query parameter 'budget': Input should be less than or equal to 30",
                 "This request cannot be answered"),
                (f"/user/{XSS}", f"unknown user '{XSS}'", "Not found")):
            browser.get(base + path)
            assert no_alert(browser)
            assert browser.find_element(By.CSS_SELECTOR, "main .error").text == message
            assert browser.find_element(By.CSS_SELECTOR, "main h1").text == heading  # (every one was "cfb")
            browser.find_element(By.ID, "back").click()
            WebDriverWait(browser, 20).until(lambda d: d.find_elements(By.ID, "signup"))
            assert browser.current_url == base + "/"


def test_a_failed_signup_says_so_in_the_pages_words(trained, db_url, browser):
    """An id already taken, and a write without the server's token, said in the page's words (they were
    the API's: "request body, field 'user': …", "needs `Authorization: Bearer <token>`")."""
    wait = WebDriverWait(browser, 20)
    for token, message in ((None, "user 'a0' already exists"),
                           ("s3cret", "This server needs its API token to write: enter it in the API token box above.")):
        with running_server(db_url, token=token) as base:
            browser.get(base + "/?budget=5")
            browser.find_element(By.ID, "user-id").send_keys("a0" if token is None else "fresh1")
            browser.find_element(By.ID, "signup-submit").click()
            wait.until(lambda d: d.find_element(By.ID, "signup-error").text)
            assert browser.find_element(By.ID, "signup-error").text == message
            assert no_alert(browser)


def test_the_explore_maps_labels_do_not_overlap_as_the_browser_draws_them(trained, db_url, browser):
    """The PCA map's labels, measured by the browser's own font (getBBox): no two overlap and each lies
    inside the map; the planted items sit in two tight clusters, so some are left out, their points kept."""
    with running_server(db_url) as base:
        browser.get(base + "/explore?n=40")
        boxes = browser.execute_script(
            "return [...document.querySelectorAll('#pca svg a text')].map(t => {"
            "const b = t.getBBox(); return [b.x, b.y, b.x + b.width, b.y + b.height]; });")
        gaps = browser.execute_script(  # each label's distance from its own point
            "return [...document.querySelectorAll('#pca svg a')].filter(a => a.querySelector('text')).map(a => {"
            "const b = a.querySelector('text').getBBox(), c = a.querySelector('circle');"
            "const x = c.cx.baseVal.value, y = c.cy.baseVal.value;"
            "return Math.hypot(Math.max(b.x - x, 0, x - b.x - b.width), Math.max(b.y - y, 0, y - b.y - b.height)); });")
        points = len(browser.find_elements(By.CSS_SELECTOR, "#pca svg a circle"))
        width, height = browser.execute_script(
            "const v = document.querySelector('#pca svg').viewBox.baseVal; return [v.width, v.height];")
    assert points == 40 and 2 <= len(boxes) < points
    assert all(0 <= x0 and x1 <= width and 0 <= y0 and y1 <= height for x0, y0, x1, y1 in boxes)
    overlapping = [(a, b) for i, a in enumerate(boxes) for b in boxes[i + 1:]
                   if a[0] < b[2] - 0.5 and b[0] < a[2] - 0.5 and a[1] < b[3] - 0.5 and b[1] < a[3] - 0.5]
    assert not overlapping
    assert max(gaps) <= 10  # (a label left of its point ends there, whatever the font's width)


def test_a_list_shown_again_from_history_is_fetched_afresh(trained, db_url, browser):
    """Back to a user's recommendations after an item was rated elsewhere: the list is the server's now,
    not the one drawn before (the browser restored the old list, the rated item still in it)."""
    from cfb.service.ratings import rate_item

    engine, _ = trained
    wait = WebDriverWait(browser, 20)
    with running_server(db_url) as base:
        browser.get(base + "/user/a0")
        wait.until(lambda d: len(rec_items(d)) == 10)
        top = rec_items(browser)[0]
        browser.get(base + "/explore?n=5")
        rate_item(engine, "a0", top, 1)  # (another tab, the CLI or the API)
        browser.back()
        wait.until(lambda d: "/user/a0" in d.current_url)
        wait.until(lambda d: len(rec_items(d)) == 10 and top not in rec_items(d))
        assert browser.find_element(By.ID, "recs").get_attribute("data-updated")  # (redrawn by the page itself)


def test_a_failed_signup_marks_its_field_and_takes_the_focus(trained, db_url, browser):
    """An id already taken: the id box is marked invalid, described by the message and focused (the focus
    fell to the page's body); with the server gone the page says it cannot reach it (it said "Failed to
    fetch")."""
    wait = WebDriverWait(browser, 20)
    with running_server(db_url) as base:
        browser.get(base + "/?budget=5")
        box = browser.find_element(By.ID, "user-id")
        assert box.get_attribute("maxlength") == "255"
        box.send_keys("a0")
        browser.find_element(By.ID, "signup-submit").click()
        wait.until(lambda d: d.find_element(By.ID, "signup-error").text)
        assert browser.find_element(By.ID, "signup-error").text == "user 'a0' already exists"
        focused = browser.switch_to.active_element
        assert focused.get_attribute("id") == "user-id" and focused.get_attribute("aria-invalid") == "true"
        assert focused.get_attribute("aria-describedby") == "signup-error"
    box.clear()
    box.send_keys("fresh2")
    browser.find_element(By.ID, "signup-submit").click()
    wait.until(lambda d: d.find_element(By.ID, "signup-error").text.startswith("The server cannot be reached"))
    assert browser.find_element(By.ID, "user-id").get_attribute("aria-invalid") is None  # (cleared on a new try)


def test_one_signup_per_press_and_a_finished_one_is_not_sent_again_from_history(trained, db_url, browser):
    """Two submits while the first is on its way make one user (they made two); Back to the form after
    signing up shows it empty (it came back filled in, and a second press made a second user)."""
    engine, _ = trained
    count = "SELECT count(*) FROM users"
    with engine.connect() as conn:
        before = conn.scalar(text(count))
    wait = WebDriverWait(browser, 20)
    with running_server(db_url) as base:
        browser.get(base + "/?budget=5")
        Select(browser.find_element(By.CSS_SELECTOR, "select[data-attr='gender']")).select_by_visible_text("F")
        sent = browser.execute_script("""
            var fetched = window.fetch, sent = 0;
            window.fetch = function (url, opts) {
              if (opts && opts.method === "POST") { sent += 1; }
              return fetched(url, opts);
            };
            var f = document.getElementById('signup'); f.requestSubmit(); f.requestSubmit();
            return sent;""")
        assert sent == 1  # (both submits are handled before the script returns: the second sent nothing)
        wait.until(lambda d: "/user/" in d.current_url and len(rec_items(d)) == 10)
        with engine.connect() as conn:
            assert conn.scalar(text(count)) == before + 1
        browser.back()
        wait.until(lambda d: "/user/" not in d.current_url)
        wait.until(lambda d: Select(d.find_element(By.CSS_SELECTOR, "select[data-attr='gender']"))
                   .first_selected_option.get_attribute("value") == "")


def test_a_wrong_token_is_named_and_a_failed_rating_clears_the_last_status(trained, db_url, browser):
    wait = WebDriverWait(browser, 20)
    with running_server(db_url, token="s3cret") as base:
        browser.get(base + "/user/a0")
        wait.until(lambda d: len(rec_items(d)) == 10)
        browser.find_element(By.ID, "api-token").send_keys("s3cret")
        Select(browser.find_element(By.CSS_SELECTOR, "#recs > li select")).select_by_value("5")
        browser.find_element(By.CSS_SELECTOR, "#recs > li button.rate").click()
        wait.until(lambda d: d.find_element(By.ID, "rate-status").text.startswith("Rated "))
        browser.find_element(By.ID, "api-token").clear()
        browser.find_element(By.ID, "api-token").send_keys("wrong")
        Select(browser.find_element(By.CSS_SELECTOR, "#recs > li select")).select_by_value("4")
        browser.find_element(By.CSS_SELECTOR, "#recs > li button.rate").click()
        wait.until(lambda d: d.find_element(By.ID, "rate-error").text)
        assert browser.find_element(By.ID, "rate-error").text == \
            "The API token entered is not this server's: check it in the API token box above."
        assert browser.find_element(By.ID, "rate-status").text == ""


def test_find_a_user_or_an_item_from_any_page(trained, db_url, browser):
    """The menu's Find page goes to a user's recommendations by id and to an item's page by id or title
    (they were reachable only by typing an address)."""
    wait = WebDriverWait(browser, 20)
    with running_server(db_url) as base:
        browser.get(base + "/explore?n=5")
        browser.find_element(By.LINK_TEXT, "Find").click()
        wait.until(lambda d: d.find_elements(By.ID, "find-user"))
        browser.find_element(By.CSS_SELECTOR, "#find-user input").send_keys("a0\n")
        wait.until(lambda d: "/user/a0" in d.current_url and len(rec_items(d)) == 10)
        browser.get(base + "/find")
        for form in ("#find-user", "#find-item"):  # only spaces: the browser says the field needs more
            box = browser.find_element(By.CSS_SELECTOR, f"{form} input")
            box.send_keys("   ")
            assert browser.execute_script("return arguments[0].checkValidity()", box) is False
            box.clear()
        browser.find_element(By.CSS_SELECTOR, "#find-item input").send_keys("Beta film 25\n")
        wait.until(lambda d: d.find_elements(By.ID, "item-title"))
        assert browser.find_element(By.ID, "item-title").text == "Beta film 25"
        assert len(browser.find_elements(By.CSS_SELECTOR, "#similar li")) == 10


def test_the_explore_map_is_a_group_of_named_links_with_a_table_beside_it(trained, db_url, browser):
    """The map's links are not inside an image role (whose children a screen reader may hide), each is
    named once by its title (it was "Fargo (1996) Fargo (1996)"), the same items are in a table, and the
    bias lists' minimum number of ratings can be set on the page."""
    with running_server(db_url) as base:
        browser.get(base + "/explore?n=12")
        svg = browser.find_element(By.CSS_SELECTOR, "#pca svg")
        assert svg.get_attribute("role") == "group"
        links = browser.find_elements(By.CSS_SELECTOR, "#pca svg a")
        titles = browser.execute_script(
            "return [...document.querySelectorAll('#pca svg a title')].map(t => t.textContent)")
        assert [a.get_attribute("aria-label") for a in links] == titles and len(titles) == 12
        rows = browser.find_elements(By.CSS_SELECTOR, "#pca-table tbody tr")
        assert len(rows) == 12
        assert [r.find_element(By.TAG_NAME, "a").get_attribute("textContent") for r in rows] == titles
        box = browser.find_element(By.CSS_SELECTOR, "#explore-controls input[name='min_ratings']")
        box.clear()
        box.send_keys("1000\n")
        WebDriverWait(browser, 20).until(lambda d: d.find_elements(By.ID, "no-biases"))
        assert "min_ratings=1000" in browser.current_url and "n=12" in browser.current_url
        for name in ("n", "min_ratings"):  # a field left empty is not sent (it was a 422 naming 'n')
            box = browser.find_element(By.CSS_SELECTOR, f"#explore-controls input[name='{name}']")
            box.clear()
            box.send_keys("\n")
            time.sleep(0.5)
            assert "min_ratings=1000" in browser.current_url and browser.find_elements(By.ID, "no-biases")
            browser.get(base + "/explore?n=12&min_ratings=1000")


def test_a_user_sees_and_changes_the_ratings_they_gave(trained, db_url, browser):
    """The user's page lists their latest ratings, newest first, each showing its value; choosing another
    and Change stores it, and a rating given from the recommendations joins the top of the list (a user
    could not see or change what they had rated)."""
    engine, _ = trained
    wait = WebDriverWait(browser, 20)

    def given(d) -> list[tuple[str, str]]:
        return d.execute_script("return [...document.querySelectorAll('#my-ratings > li')].map("
                                "li => [li.dataset.item, li.querySelector('select').value])")

    from cfb.service.ratings import rate_item

    rate_item(engine, "a0", "b21", 3.7)  # (a value the page's whole-star choices lack: shown all the same)
    with running_server(db_url) as base:
        browser.get(base + "/user/a0")
        wait.until(lambda d: len(rec_items(d)) == 10)
        first = given(browser)
        assert first[0] == ["b21", "3.7"]
        assert len(first) == 20 and browser.find_element(By.ID, "ratings-count").text.startswith("24 in all")
        item, value = first[-1]
        changed = "1" if value != "1" else "5"
        row = browser.find_elements(By.CSS_SELECTOR, "#my-ratings > li")[-1]
        Select(row.find_element(By.TAG_NAME, "select")).select_by_value(changed)
        row.find_element(By.CSS_SELECTOR, "button.rate").click()
        wait.until(lambda d: given(d)[0] == [item, changed])
        top = rec_items(browser)[0]
        Select(browser.find_element(By.CSS_SELECTOR, "#recs > li select")).select_by_value("4")
        browser.find_element(By.CSS_SELECTOR, "#recs > li button.rate").click()
        wait.until(lambda d: given(d)[:2] == [[top, "4"], [item, changed]])
        assert given(browser)[2] == ["b21", "3.7"]  # (drawn by the page's script too)
        assert browser.find_element(By.ID, "ratings-count").text.startswith("25 in all")
    with engine.connect() as conn:
        stored = dict(conn.execute(text("SELECT i.external_id, r.rating FROM ratings r JOIN users u ON u.id = r.user_id "
                                        "JOIN items i ON i.id = r.item_id WHERE u.external_id = 'a0'")).all())
    assert stored[item] == float(changed) and stored[top] == 4.0


def test_a_stored_rating_stays_said_when_a_list_then_fails_to_load_and_focus_follows_its_item(trained, db_url,
                                                                                              browser):
    """The rating is stored, then the lists cannot be fetched: the page says it was stored (it cleared "Rated …"
    and showed only the error, so a user would rate again). Changed from the ratings given with the keyboard,
    the rating moves to the top and the focus goes with it (it stayed at the old place: another item's row)."""
    from selenium.webdriver.common.keys import Keys

    wait = WebDriverWait(browser, 20)
    with running_server(db_url) as base:
        browser.get(base + "/user/a0")
        wait.until(lambda d: len(rec_items(d)) == 10)
        rows = browser.find_elements(By.CSS_SELECTOR, "#my-ratings > li")
        item, sel = rows[-1].get_attribute("data-item"), rows[-1].find_element(By.TAG_NAME, "select")
        value = Select(sel).first_selected_option.get_attribute("value")
        Select(sel).select_by_value("1" if value != "1" else "5")
        sel.send_keys(Keys.ENTER)
        wait.until(lambda d: d.execute_script(  # (in one script: the lists may be redrawn between two calls)
            "var li = document.querySelector('#my-ratings > li');"
            "return li && document.getElementById('recs').dataset.updated && li.dataset.item") == item)
        focused = browser.switch_to.active_element
        assert focused.tag_name == "select" and focused.get_attribute("data-item") == item
        browser.execute_script("""
            var fetched = window.fetch;
            window.fetch = function (url, opts) {
              if (opts && opts.method === "GET") { return Promise.reject(new TypeError("Failed to fetch")); }
              return fetched(url, opts);
            };""")
        Select(browser.find_element(By.CSS_SELECTOR, "#recs > li select")).select_by_value("4")
        browser.find_element(By.CSS_SELECTOR, "#recs > li button.rate").click()
        wait.until(lambda d: d.find_element(By.ID, "rate-error").text)
        assert browser.find_element(By.ID, "rate-status").text.startswith("Rated ")
        assert browser.find_element(By.ID, "rate-error").text.startswith(
            "Stored; the lists could not be updated: The server cannot be reached")
