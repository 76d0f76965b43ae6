"""featcircuits view GRAPH.json -o graph.html [--dashboards D.json] [--image graph.svg] [--screenshot graph.png]"""

from __future__ import annotations

import argparse
import sys

HELP = "Write the interactive HTML viewer (and optionally a static picture) for a graph or circuit JSON file."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("graph", help="attribution graph JSON (circuit-tracer/Neuronpedia format) or a saved Circuit")
    parser.add_argument("-o", "--output", required=True, help="HTML file to write (self-contained)")
    parser.add_argument("--dashboards", help="dashboard JSON (FeatureDashboards.save) filling the node cards")
    parser.add_argument("--title", help="page title (default: the graph's slug or prompt)")
    parser.add_argument("--image", help="also draw a static .svg/.png/.pdf (graphviz dot if installed, else matplotlib)")
    parser.add_argument("--screenshot", help="also render the page in headless Chromium to this .png")


def run(args: argparse.Namespace) -> int:
    from .._paths import output_file
    from ..viz.page import write_page
    from ..viz.viewer import viewer_payload

    output_file(args.output, "-o/--output")  # before any work
    for flag, value in (("--image", args.image), ("--screenshot", args.screenshot)):
        if value:
            output_file(value, flag)
    payload = viewer_payload(args.graph, args.dashboards, args.title)
    path = write_page(payload, args.output, payload["title"])
    with_cards = sum(node["dash_key"] in payload["dashboards"] for node in payload["nodes"] if node["dash_key"])
    print(f"wrote {path}: {len(payload['nodes'])} nodes ({payload['n_feature_nodes']} features, {with_cards} with "
          f"dashboard entries), {len(payload['links'])} edges")
    if args.image:
        from ..viz.static import find_dot, render_graph_image

        image = render_graph_image(args.graph, args.image, title=args.title)
        print(f"wrote {image} ({'graphviz dot' if find_dot() else 'matplotlib'})")
    if args.screenshot:
        from ..viz.browser import BrowserError, HeadlessChromium

        try:
            with HeadlessChromium() as browser:
                browser.open(path)
                # Widen the window to the whole graph (plus the card panel) so the picture shows all of it.
                size = browser.evaluate("(() => { const g = document.getElementById('fc-graph');"
                                        " return g ? [g.width.baseVal.value, g.height.baseVal.value] : [0, 0]; })()")
                browser.resize(min(max(1280, size[0] + 440), 8000), min(max(860, size[1] + 200), 8000))
                shot = browser.screenshot(args.screenshot)
                problems = browser.errors
        except BrowserError as error:
            print(f"featcircuits view: error: {error}", file=sys.stderr)
            return 2
        print(f"wrote {shot}" + (f"; the page reported errors: {problems}" if problems else ""))
        return 1 if problems else 0
    return 0
