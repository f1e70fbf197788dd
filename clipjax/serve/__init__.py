"""`clipjax serve`: a search page and a JSON API over a `clipjax embed` cache.

    batcher.py     concurrent queries embedded together, on one model thread
    queries.py     the request body of POST /api/search, checked (4xx on bad input)
    service.py     the model and the index: a query in, hits out
    thumbnails.py  indexed files only, thumbnailed once and cached
    app.py         the Starlette app: routes, bearer token, errors as JSON
    static/        the page (plain HTML, CSS and JavaScript; nothing fetched from elsewhere)
"""
