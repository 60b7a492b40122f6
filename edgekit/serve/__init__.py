"""``edgekit serve``: an OpenAI-compatible HTTP server with continuous batching (see DESIGN.md, "Serve").

``edgekit.serve.app.create_app(folder, ServeConfig(...))`` returns the FastAPI app; fastapi and
uvicorn come with ``pip install 'edgekit-llm[serve]'``.
"""
