"""Using a model over HTTP: the FastAPI app (app), its guard (refusals, the model queue, request
metrics, body limits, JSON errors), reading bodies and forms (requests), and its web page (static/).
The offline jobs it calls are `flava.retrieval`."""
