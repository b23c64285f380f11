"""An invented staff handbook for measuring RAG answers: 32 short documents with a
``section`` column and 48 questions with reference answers (numbers, form codes such as
``QF-7781``, names) and the id of the document that holds the answer.

Used by tests/test_rag_answers.py and tests/benchmarks/bench_rag_answers.py. The facts are
made up, so no model can answer from memory.
"""

DOCUMENTS = [
    (1, "leave", "Annual leave: every full-time employee receives 27 days of paid annual leave per calendar year. Up to 5 unused days can be carried over to the next year."),
    (2, "leave", "Parental leave: a new parent may take up to 45 days of fully paid parental leave within the first year after a birth or adoption. Request it with form QF-7781 at least four weeks in advance."),
    (3, "leave", "Sick leave: employees who are ill for more than 3 consecutive days send a doctor's note to Human Resources. Sick days are reported to Greta Olsen in the HR office."),
    (4, "leave", "Unpaid leave: a sabbatical of up to 6 months of unpaid leave can be granted after four years of service. Applications go to the director of Human Resources, Marcus Feld."),
    (5, "expenses", "Meals: the daily meal allowance on business trips is 38 euros. Receipts are not needed below this amount."),
    (6, "expenses", "Expense claims are filed with form QF-2290 within 30 days of the purchase. Claims are approved by the team lead and paid with the next salary."),
    (7, "expenses", "Corporate credit cards are issued by the finance team to employees who travel more than six times a year. The monthly card limit is 2,500 euros."),
    (8, "travel", "Trains: employees travel second class on train journeys shorter than four hours and first class on longer journeys."),
    (9, "travel", "Flights are booked through the travel desk of Norvia Travel, reachable at extension 4417. Economy class is the rule for flights under nine hours."),
    (10, "travel", "Hotels: a hotel night is reimbursed up to 140 euros in most cities and up to 210 euros in London, Paris and Tokyo."),
    (11, "security", "Badges: a lost access badge is reported to the security desk within 24 hours. A replacement badge costs 15 euros."),
    (12, "security", "Passwords are at least 14 characters long and are changed every 180 days. Never share a password, not even with the IT help desk."),
    (13, "security", "Visitors sign in at the front desk on floor 2 and wear a red visitor badge. Their host escorts them at all times."),
    (14, "security", "Security incidents, such as a phishing email, are reported to the security team with form QF-5530 or by calling extension 7700."),
    (15, "it", "The IT help desk is open from 8:00 to 18:00 on weekdays. Its ticket system is called Beacon."),
    (16, "it", "Laptops: the IT team hands out a new laptop on the first working day. Laptops are replaced every 4 years."),
    (17, "it", "Software that is not on the approved list needs a request with form QF-4412, approved by the chief information officer, Lena Park."),
    (18, "it", "The company VPN is called Tunnelbird. It must be used on every public Wi-Fi network."),
    (19, "payroll", "Salaries are paid on the 25th of every month. Payslips are available in the Paystream portal."),
    (20, "payroll", "Overtime is paid at 125 percent of the hourly rate, or taken as time off within three months."),
    (21, "payroll", "The yearly bonus is decided in March and paid with the April salary. It can reach 12 percent of the annual salary."),
    (22, "facilities", "The office building opens at 6:30 and closes at 22:00. On weekends, entry needs a badge with weekend access."),
    (23, "facilities", "Meeting rooms are booked in the Roomly app. The largest room, the Atlas room on floor 5, seats 40 people."),
    (24, "facilities", "The staff canteen serves lunch from 11:30 to 14:00. A lunch costs 4.50 euros for employees."),
    (25, "facilities", "Bicycles are parked in the basement garage. Showers are next to the bike room."),
    (26, "onboarding", "Every new employee gets a buddy for the first three months. The onboarding program is run by Priya Natarajan."),
    (27, "onboarding", "The probation period lasts 6 months. A review meeting with the manager takes place halfway through."),
    (28, "onboarding", "New employees complete the mandatory compliance training within 14 days of their start date, on the learning platform Skillhaven."),
    (29, "leave", "Public holidays: the office is closed on 11 public holidays per year. Human Resources publishes the list in December."),
    (30, "expenses", "Mileage: a private car used on a business trip is paid at 0.30 euros per kilometre."),
    (31, "security", "Confidential documents go into the locked grey bins. The shredding contractor is Papyrex."),
    (32, "it", "Printer problems are reported in the Beacon ticket system under category P-12."),
]

QUESTIONS = [
    ("How many days of paid annual leave does a full-time employee get?", "27", 1),
    ("How many unused leave days can be carried over to the next year?", "5", 1),
    ("How many days of paid parental leave can a new parent take?", "45 days", 2),
    ("Which form is used to request parental leave?", "QF-7781", 2),
    ("After more than how many days of illness is a doctor's note needed?", "3", 3),
    ("Who receives the reports of sick days?", "Greta Olsen", 3),
    ("How long can an unpaid sabbatical last?", "6 months", 4),
    ("Who is the director of Human Resources?", "Marcus Feld", 4),
    ("What is the daily meal allowance on business trips?", "38 euros", 5),
    ("Which form is used to file an expense claim?", "QF-2290", 6),
    ("Within how many days of a purchase must an expense claim be filed?", "30", 6),
    ("What is the monthly limit of a corporate credit card?", "2,500 euros", 7),
    ("Which class do employees use on train journeys shorter than four hours?", "second class", 8),
    ("Which travel agency books the flights?", "Norvia Travel", 9),
    ("What is the phone extension of the travel desk?", "4417", 9),
    ("Up to how much is a hotel night reimbursed in most cities?", "140 euros", 10),
    ("What is the hotel limit per night in London?", "210 euros", 10),
    ("How much does a replacement badge cost?", "15 euros", 11),
    ("Within how many hours must a lost badge be reported?", "24", 11),
    ("What is the minimum length of a password?", "14 characters", 12),
    ("How often are passwords changed?", "180 days", 12),
    ("On which floor do visitors sign in?", "2", 13),
    ("What color is the visitor badge?", "red", 13),
    ("Which form is used to report a security incident?", "QF-5530", 14),
    ("Which extension do you call to report a phishing email?", "7700", 14),
    ("What is the name of the IT ticket system?", "Beacon", 15),
    ("At what time does the IT help desk close on weekdays?", "18:00", 15),
    ("How often are laptops replaced?", "4 years", 16),
    ("Which form is used to request software that is not on the approved list?", "QF-4412", 17),
    ("Who is the chief information officer?", "Lena Park", 17),
    ("What is the name of the company VPN?", "Tunnelbird", 18),
    ("On which day of the month are salaries paid?", "25th", 19),
    ("Where are payslips available?", "Paystream", 19),
    ("At what rate is overtime paid?", "125 percent", 20),
    ("With which month's salary is the yearly bonus paid?", "April", 21),
    ("What is the maximum yearly bonus?", "12 percent", 21),
    ("At what time does the office building open?", "6:30", 22),
    ("In which app are meeting rooms booked?", "Roomly", 23),
    ("How many people does the Atlas room seat?", "40", 23),
    ("How much does a lunch in the staff canteen cost?", "4.50 euros", 24),
    ("Where are bicycles parked?", "basement garage", 25),
    ("Who runs the onboarding program?", "Priya Natarajan", 26),
    ("How long is the probation period?", "6 months", 27),
    ("On which platform is the compliance training done?", "Skillhaven", 28),
    ("How many public holidays per year is the office closed?", "11", 29),
    ("How much is mileage paid per kilometre?", "0.30 euros", 30),
    ("Who is the shredding contractor?", "Papyrex", 31),
    ("Under which category are printer problems reported?", "P-12", 32),
]


def documents_frame():
    import pandas as pd

    return pd.DataFrame(DOCUMENTS, columns=["id", "section", "text"])


def questions_frame(rows=QUESTIONS):
    import pandas as pd

    return pd.DataFrame(rows, columns=["question", "answer", "source_id"])
