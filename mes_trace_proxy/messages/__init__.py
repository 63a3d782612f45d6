"""The message path: dead letters RabbitMQ gives up on, held, explained, traced, re-driven (docs/messages.md).

Pure core: ``deadletter`` (``x-death``, message rules, the cause in words), ``record`` (the held
message and its JSON form), ``settings`` (the ``messages`` config section, the auto policy),
``explain`` (``explain-message``) and ``page`` (the page's "Dead letters" section).
Shell: ``watcher`` (the consumer), ``held`` (the stores), ``redrive`` (publishing back with
confirms), ``spans``, ``service`` (``MessagePath``: all of it for the lifecycle), ``admin``
(``POST /orders/{id}/redrive``) and ``demo`` (the demo's message path).
"""
