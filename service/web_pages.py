"""The web page's HTML, from the answers the API gives (``serving``, ``inspect``): functions that take
data and return markup, every value from the data escaped. ``cfb.service.http`` reads the data and
serves the pages; ``web/static/app.js`` redraws their lists in place."""
from __future__ import annotations

import json
from html import escape
from pathlib import Path
from string import Template

import numpy as np
from fastapi.responses import HTMLResponse

from ..bootstrap.questionnaire import MAX_TEXT_ANSWER
from ..db import store
from .http_json import MAX_MIN_RATINGS
from .inspect import item_href, pca_svg
from .serving import NOTHING_LEFT

WEB = Path(__file__).parent / "web"
RATINGS_SHOWN = 20  # the latest ratings a user's page lists


def page(title: str, body: str, token_required: bool = False) -> HTMLResponse:
    """``body`` in the site's frame (its menu, and the page script told whether writes need a token)."""
    base = Template((WEB / "templates" / "base.html").read_text(encoding="utf-8"))
    return HTMLResponse(base.substitute(title=escape(title), body=body,
                                        token_required="true" if token_required else "false"))


def rating_choices(scale: tuple[float, float], step: float | None) -> list[float]:
    """The ratings the web page offers: each step of the scale (the step its first ingest fixed; else
    whole stars, half stars on a scale that starts at a half, or tenths of a scale narrower than two
    stars), or 11 of them spread evenly where there would be over 101."""
    lo, hi = scale
    if step is None:
        step = 0.5 if lo % 1 else 1.0
        if hi - lo < 2 * step:
            step = (hi - lo) / 10 or 1.0
    n = int(round((hi - lo) / step))
    k = np.round(np.linspace(0, n, 11)) if n > 100 else np.arange(n + 1)
    return [round(lo + float(x) * step, 10) for x in k]


def ratings_count_text(count: int) -> str:
    """What a user's page says above the ratings it lists."""
    if not count:
        return "None yet."
    return f"{count:,} in all; the latest {RATINGS_SHOWN}, newest first:" if count > RATINGS_SHOWN else \
        f"{count:,}, newest first:"


def error_heading(status: int) -> str:
    """An error page's heading: what kind of error its HTTP status says it is."""
    if status == 404:
        return "Not found"
    if status in (401, 403):
        return "Not allowed"
    if status == 503:
        return "Not available: try again shortly"
    return "This request cannot be answered" if status < 500 else "Something went wrong on the server"


def error_body(heading: str, message: str, suggestions: list[str] | None = None) -> str:
    """An error page: its one-line message, what to ask for instead as links (an unknown item's close
    titles, or the ids of the items a shared title names), a link back."""
    links = "".join(f"<li><a href='{item_href(t)}'>{escape(t)}</a></li>" for t in suggestions or [])
    return (f"<h1>{heading}</h1><p class='error' role='alert'>{escape(message)}</p>"
            + (f"<p>Did you mean:</p><ul id='suggestions'>{links}</ul>" if links else "") +
            "<p><a id='back' href='/'>Back to the start page</a></p>")


def shown_name(entry: dict) -> str:
    """An item's title (else its id), escaped."""
    return escape(str(entry.get("title") or entry.get("item")))


def rating_select(scale: list[float], name: str, entry: dict, blank: str, chosen: float | None = None) -> str:
    """The rating control of an item (``entry``: its "item" and "title"), named after the item, showing
    ``chosen`` (a value the choices lack, 3.5 on a scale of whole stars, is added to them)."""
    values = scale if chosen is None or chosen in scale else sorted([*scale, chosen])
    opts = [f"<option value=''>{escape(blank)}</option>"]
    opts += [f"<option value='{v:g}'{' selected' if v == chosen else ''}>{v:g}</option>" for v in values]
    return (f"<select name='{escape(name)}' data-item='{escape(str(entry['item']))}' "
            f"aria-label='rating for {shown_name(entry)}'>{''.join(opts)}</select>")


def signup_body(q: dict, scale: list[float]) -> str:
    """The sign-up page: the questionnaire (``onboard.questionnaire_json``) as a form."""
    rows = []
    for a in q["attributes"]:
        name = escape(a["name"])
        if a.get("type") == "category":
            opts = "".join(f"<option value='{escape(str(v))}'>{escape(str(v))}</option>"  # (the value
                           for v in a.get("values") or [])  # exactly: a browser trims an option's text)
            field = f"<select name='{name}' data-attr='{name}'><option value=''>(no answer)</option>{opts}</select>"
        elif a.get("type") == "number":
            lo, hi = a.get("accepts") or (None, None)
            bounds = "" if lo is None else f" min='{lo!r}' max='{hi!r}'"  # (exactly: ':g' rounds 2469134)
            field = f"<input type='number' step='any'{bounds} name='{name}' data-attr='{name}' data-number='1'>"
        else:
            field = f"<input type='text' name='{name}' data-attr='{name}' maxlength='{MAX_TEXT_ANSWER}'>"
        rows.append(f"<label>{name} {field}</label>")
    items = [f"<li><span class='title'>{shown_name(it)}</span> "
             f"{rating_select(scale, 'rate', it, 'not known')}</li>" for it in q["items"]]
    return (f"<h1>Sign up</h1><form id='signup' data-asked='{len(q['items'])}' data-version='{q['version']}'>"
            f"<fieldset><legend>About you</legend>"
            f"<label>user id (optional) <input type='text' name='user' id='user-id' "
            f"maxlength='{store.MAX_ID_LENGTH}'></label>"
            f"{''.join(rows)}</fieldset>"
            + (f"<fieldset><legend>Rate the ones you know</legend><ol class='rate-items'>{''.join(items)}</ol>"
               f"</fieldset>" if items else "") +  # (a questionnaire of no items: no empty box)
            f"<button type='submit' id='signup-submit'>Sign up and get recommendations</button>"
            f"<p id='signup-error' class='error' role='alert' tabindex='-1'></p></form>"
            f"<p class='small'>Model version {q['version']}.</p>")


def user_body(rec: dict, given: dict, scale: list[float], n: int) -> str:
    """A user's page: their recommendations (``serving.recommend``) and the latest ratings they gave
    (``serving.user_ratings``), each with its rating control."""
    items = "".join(_rec_row(it, scale) for it in rec["items"])
    rated = "".join(_rated_row(it, scale) for it in given["ratings"])
    return (f"<h1>Recommendations for <span id='user-name'>{escape(rec['user'])}</span></h1>"
            f"<p>Ranked for you by cfb's ranking model; the number is the predicted rating (the order need not "
            f"follow it). Rate any of them (choose a rating, then Rate or Enter): "
            f"the list updates at once.</p>"
            f"<ol id='recs' data-user='{escape(rec['user'])}' data-n='{n}' "
            f"data-scale='{escape(json.dumps(scale))}'>{items}</ol>"
            f"<p id='no-recs'{' hidden' if items else ''}>{NOTHING_LEFT.capitalize()}.</p>"
            f"<p id='rate-status' role='status'></p><p id='rate-error' class='error' role='alert'></p>"
            f"<h2>Ratings given</h2><p class='small' id='ratings-count'>{ratings_count_text(given['count'])}</p>"
            f"<ol id='my-ratings' data-n='{RATINGS_SHOWN}'>{rated}</ol>")


def _rec_row(it: dict, scale: list[float]) -> str:
    return (f"<li data-item='{escape(str(it['item']))}'><a class='title' href='{item_href(it['item'])}'>"
            f"{shown_name(it)}</a> <span class='score'>{it['score']:.2f}</span> "
            f"{rating_select(scale, 'rate', it, 'rate…')} "
            f"<button type='button' class='rate' aria-label='rate {shown_name(it)}'>Rate</button></li>")


def _rated_row(it: dict, scale: list[float]) -> str:
    """A rating given, its list showing the value (choose another, then Change, to change it)."""
    return (f"<li data-item='{escape(str(it['item']))}'><a class='title' href='{item_href(it['item'])}'>"
            f"{shown_name(it)}</a> {rating_select(scale, 'rate', it, 'rate…', it['rating'])} "
            f"<button type='button' class='rate' aria-label='change the rating of {shown_name(it)}'>Change</button></li>")


def item_body(out: dict) -> str:
    """An item's page: the items most similar to it (``serving.similar``)."""
    rows = "".join(f"<li><a href='{item_href(it['item'])}'>{shown_name(it)}</a> "
                   f"<span class='score'>{it['score']:.3f}</span></li>" for it in out["items"])
    return (f"<h1 id='item-title'>{shown_name(out)}</h1><p class='small'>item {escape(str(out['item']))}</p>"
            f"<h2>Similar items</h2><p class='small'>By the cosine similarity of their factors to this item's "
            f"(1: the same direction, liked by the same people; 0: unrelated).</p><ol id='similar'>{rows}</ol>")


def new_item_body(new: dict) -> str:
    """The page of an item of the catalogue that no trained version holds yet (``serving.item_not_in_model``)."""
    when = "once someone has rated it" if new["waits_for_a_rating"] else "at the recommender's next update"
    return (f"<h1 id='item-title'>{shown_name(new)}</h1><p class='small'>item {escape(str(new['item']))}</p>"
            f"<h2>Similar items</h2><p id='not-yet'>This item is new to the recommender: its similar items, "
            f"and its place in recommendations, come {when}.</p>")


_NOT_BLANK = "required pattern='.*\\S.*' title='an id or title, not only spaces'"  # (spaces alone found nothing, unsaid)
FIND_BODY = ("<h1>Find</h1>"
             "<form method='get' action='/find' id='find-user'><label>user id <input type='text' name='user' "
             f"{_NOT_BLANK}></label> <button type='submit'>Their recommendations</button></form>"
             "<form method='get' action='/find' id='find-item'><label>item id or title <input type='text' "
             f"name='item' {_NOT_BLANK}></label> <button type='submit'>Its similar items</button></form>")


def explore_body(result: dict, biases: dict | None, biases_error: str | None, n: int, min_ratings: int) -> str:
    """The explore page: the PCA map of the item factors (``inspect.pca``), as a table too, and the
    lowest and highest item biases (``serving.biases``; ``biases_error`` where the model has none)."""
    if biases is None:
        biases_html = f"<p class='error'>{escape(biases_error or '')}</p>"
    else:
        biases_html = "" if biases["lowest"] else (  # (an empty pair of lists said nothing)
            f"<p id='no-biases'>No item has {min_ratings:,} ratings or more: "
            f"<a href='/explore?n={n}&amp;min_ratings=1'>every rated item</a>.</p>")
        biases_html += "".join(
            f"<div><h2>{label} bias</h2><ol>" + "".join(
                f"<li><a href='{item_href(it['item'])}'>{shown_name(it)}</a> "
                f"<span class='score'>{it['score']:+.3f}</span></li>" for it in biases[key]) + "</ol></div>"
            for label, key in (("Lowest", "lowest"), ("Highest", "highest")) if biases[key])
    ev = ", ".join(f"PC{k + 1} {v:.0%}" for k, v in enumerate(result["explained_variance"]))
    table = "".join(f"<tr><td><a href='{item_href(it['item'])}'>{shown_name(it)}</a></td>"
                    f"<td>{it.get('pc1', 0.0):+.3f}</td><td>{it.get('pc2', 0.0):+.3f}</td></tr>"
                    for it in result["items"])
    return (f"<h1>Explore the model (version {result['version']})</h1>"
            f"<form id='explore-controls' method='get' action='/explore'>"
            f"<label>items on the map <input type='number' name='n' min='2' max='500' value='{n}' required></label> "
            f"<label>bias lists: items with at least <input type='number' name='min_ratings' min='0' "
            f"max='{MAX_MIN_RATINGS}' value='{min_ratings}' required> ratings</label> <button type='submit'>Show</button>"
            f"</form>"
            f"<h2>Item factors of the {len(result['items'])} most-rated items: PCA</h2>"
            f"<p class='small'>Axes fitted on the {result['fitted_on']:,} most-rated items; share of their "
            f"variance: {escape(ev)}. Items close together are liked by the same "
            f"people. <a href='/inspect/pca?n={n}'>JSON</a> · <a href='#biases'>skip the map</a></p>"
            f"<figure id='pca'>{pca_svg(result)}</figure>"
            f"<details id='pca-table'><summary>The map as a table</summary><table><thead><tr><th>item</th>"
            f"<th>PC1</th><th>PC2</th></tr></thead><tbody>{table}</tbody></table></details>"
            f"<section class='biases' id='biases'><p class='small'>An item's bias is what the model adds to "
            f"everyone's predicted rating of it, whatever their taste: the lowest are liked less than "
            f"their kind of item would suggest, the highest more.</p>{biases_html}</section>")
