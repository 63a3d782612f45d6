"""The message path: dead letters RabbitMQ gives up on, held, explained, traced and re-driven.

``deadletter`` is the pure core (``x-death`` parsing, message rules, the cause in words);
``held`` keeps dead letters in the state store; ``watcher`` consumes them; ``redrive``
publishes them back; ``spans`` records one messaging span per dead letter.
"""
