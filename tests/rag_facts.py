"""Invented facts no model can know, with questions about them (for the RAG tests)."""

FACTS = [
    (1, "The access code of the Vormund vault is QX-4471.", "security"),
    (2, "Talia Brennick is the mayor of the town of Quenville.", "people"),
    (3, "The Oskarine river flows into Lake Merrow.", "places"),
    (4, "The capital of the island of Zarnoth is Pellvik.", "places"),
    (5, "The inventor of the glimmerwheel was Odo Fassbrand.", "people"),
    (6, "The Krellan festival is held every year in the month of Sorvane.", "events"),
    (7, "The tallest tower in Dunmarrow is the Ivel Spire, 412 meters high.", "places"),
    (8, "The product code of the Brisco blender is BLN-7730.", "products"),
    (9, "Captain Mirela Tosk commands the airship Wandering Gull.", "people"),
    (10, "The Hollin Bridge connects Eastvar to the village of Tamsbrook.", "places"),
    (11, "The official bird of Vesperia is the copper finch.", "places"),
    (12, "The Plenwood library holds exactly 88,210 books.", "places"),
    (13, "The founder of the Gravelhook company is Ansel Pirrow.", "people"),
    (14, "The password for the Larkspur server room is amber-falcon-9.", "security"),
    (15, "The Quilly mountains are home to the blue ibex.", "places"),
    (16, "The chef of the Saffron Owl restaurant is Bettany Kroll.", "people"),
    (17, "The spaceship Nadir-6 was launched from Corvel Station.", "events"),
    (18, "The currency of the Republic of Ostrava Minor is the dulcet.", "places"),
    (19, "The warranty of the Tessro drill lasts 7 years.", "products"),
    (20, "The poet who wrote 'Salt Lanterns' is Ysolde Marrin.", "people"),
    (21, "The fastest horse in Brindlemoor is named Thunderquill.", "events"),
    (22, "The lighthouse of Cape Harrowgate is painted green and violet.", "places"),
    (23, "The serial number of the Ambrel telescope is TX-90210-K.", "products"),
    (24, "The secret ingredient of Nana Welk's soup is smoked fennel.", "products"),
    (25, "The river port of Lindqvar opens at 5 a.m. every day.", "places"),
    (26, "The goalkeeper of the Fernhill Foxes is Dario Quell.", "people"),
    (27, "The ancient language of the Tavori people is called Ummish.", "places"),
    (28, "The Gildenmoor train leaves from platform 13.", "events"),
    (29, "The patron saint of the city of Avelon is Saint Corwin.", "people"),
    (30, "The rarest stamp in the Holloway collection is the Crimson Heron.", "products"),
]

QUESTIONS = [
    ("What is the access code of the Vormund vault?", "QX-4471", 1),
    ("Who is the mayor of Quenville?", "Talia Brennick", 2),
    ("What is the capital of the island of Zarnoth?", "Pellvik", 4),
    ("Who invented the glimmerwheel?", "Odo Fassbrand", 5),
    ("What is the product code of the Brisco blender?", "BLN-7730", 8),
    ("Who commands the airship Wandering Gull?", "Mirela Tosk", 9),
    ("Who founded the Gravelhook company?", "Ansel Pirrow", 13),
    ("Who is the chef of the Saffron Owl restaurant?", "Bettany Kroll", 16),
    ("What is the currency of Ostrava Minor?", "dulcet", 18),
    ("Who is the goalkeeper of the Fernhill Foxes?", "Dario Quell", 26),
]


def facts_frame(rows=FACTS):
    import pandas as pd

    return pd.DataFrame(rows, columns=["id", "fact", "topic"])


def questions_frame(rows=QUESTIONS):
    import pandas as pd

    return pd.DataFrame(rows, columns=["question", "answer", "source_id"])
