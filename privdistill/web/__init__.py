"""What the site's review page and the coordinator's /admin page share: token sessions (``session``), the login
router and page rendering over the shared templates (``pages``), the security-headers middleware (``security``),
inline SVG plots (``plots``) and the stylesheet (``static/pages.css``)."""
